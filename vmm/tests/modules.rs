//! No import circle among holdfast-vmm's modules: read every source file's paths
//! (`use crate::..`, `super::..`, `crate::..` in code), keep those from one module to
//! another that is not its ancestor or descendant (a child using its parent's items,
//! or a parent its child's, is how a module is built), take each at the level where
//! the two part (two children of one parent), and look for a cycle there.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

type Module = Vec<String>;

/// Every module of the library, by its path, with its source (inline test modules
/// cut off: their `super` is the file's module).
fn modules(src: &Path) -> BTreeMap<Module, String> {
    let mut out = BTreeMap::new();
    let mut dirs = vec![src.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).expect("source dir") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                dirs.push(path);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            let rel = path.strip_prefix(src).expect("under src");
            let mut module: Module = rel
                .iter()
                .map(|c| c.to_string_lossy().trim_end_matches(".rs").to_owned())
                .collect();
            match module.last().map(String::as_str) {
                Some("main") if module.len() == 1 => continue,
                Some("lib") if module.len() == 1 => module.clear(),
                Some("mod") => {
                    module.pop();
                }
                _ => {}
            }
            let text = std::fs::read_to_string(&path).expect("source");
            let code = match text.find("#[cfg(test)]\nmod tests {") {
                Some(at) => text[..at].to_owned(),
                None => text,
            };
            out.insert(module, code);
        }
    }
    out
}

/// The code without comments.
fn code_only(text: &str) -> String {
    text.lines()
        .map(|l| match l.find("//") {
            Some(at) => &l[..at],
            None => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The paths a use tree starting at `text` (after `crate::` or `super::`) names:
/// `a::b::{c, d::{e, f}}` gives a::b::c, a::b::d::e, a::b::d::f.
fn use_tree(text: &str) -> Vec<Vec<String>> {
    let mut prefix = Vec::new();
    let mut rest = text;
    loop {
        let seg: String = rest
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[seg.len()..];
        if !seg.is_empty() {
            prefix.push(seg);
        }
        if let Some(r) = rest.strip_prefix("::") {
            rest = r;
            if let Some(group) = rest.strip_prefix('{') {
                let mut depth = 1;
                let mut end = 0;
                for (i, c) in group.char_indices() {
                    match c {
                        '{' => depth += 1,
                        '}' => depth -= 1,
                        _ => {}
                    }
                    if depth == 0 {
                        end = i;
                        break;
                    }
                }
                let inner = &group[..end];
                let mut parts = Vec::new();
                let (mut depth, mut start) = (0, 0);
                for (i, c) in inner.char_indices() {
                    match c {
                        '{' => depth += 1,
                        '}' => depth -= 1,
                        ',' if depth == 0 => {
                            parts.push(&inner[start..i]);
                            start = i + 1;
                        }
                        _ => {}
                    }
                }
                parts.push(&inner[start..]);
                return parts
                    .iter()
                    .flat_map(|p| use_tree(p.trim()))
                    .map(|tail| prefix.iter().cloned().chain(tail).collect())
                    .collect();
            }
            continue;
        }
        return vec![prefix];
    }
}

/// The modules `module`'s code names, as absolute paths cut to a known module.
fn references(module: &Module, code: &str, known: &BTreeSet<Module>) -> BTreeSet<Module> {
    let code = code_only(code);
    let mut out = BTreeSet::new();
    let mut at = 0;
    while let Some(found) = code[at..].find(['c', 's']) {
        let i = at + found;
        at = i + 1;
        let before = code[..i].chars().next_back();
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
            continue;
        }
        let (base, rest): (Module, &str) = if let Some(r) = code[i..].strip_prefix("crate::") {
            (Vec::new(), r)
        } else if code[i..].starts_with("super::") {
            // `super` of a file's module; a `mod.rs` is its directory's module.
            let mut base = module.clone();
            let mut r = &code[i..];
            while let Some(next) = r.strip_prefix("super::") {
                base.pop();
                r = next;
            }
            (base, r)
        } else {
            continue;
        };
        for tail in use_tree(rest) {
            let full: Module = base.iter().cloned().chain(tail).collect();
            // The longest prefix that is a module.
            let target = (0..=full.len())
                .rev()
                .map(|n| full[..n].to_vec())
                .find(|m| known.contains(m))
                .unwrap_or_default();
            out.insert(target);
        }
    }
    out
}

/// A cycle in `edges`, if there is one.
fn cycle(edges: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        edges: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|n| n == node) {
            let mut c = path[at..].to_vec();
            c.push(node.to_owned());
            return Some(c);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_owned());
        for next in edges.get(node).into_iter().flatten() {
            if let Some(c) = visit(next, edges, path, done) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(node.to_owned());
        None
    }
    let mut done = BTreeSet::new();
    edges
        .keys()
        .find_map(|n| visit(n, edges, &mut Vec::new(), &mut done))
}

#[test]
fn no_module_imports_another_that_imports_it_back() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let modules = modules(&src);
    let known: BTreeSet<Module> = modules.keys().cloned().collect();
    assert!(known.contains(&vec!["disk".to_owned()]), "{known:?}");
    // Per parent, the edges between its children.
    let mut graphs: BTreeMap<Module, BTreeMap<String, BTreeSet<String>>> = BTreeMap::new();
    let mut named = 0;
    for (module, code) in &modules {
        for target in references(module, code, &known) {
            let common = module
                .iter()
                .zip(&target)
                .take_while(|(a, b)| a == b)
                .count();
            if common == module.len() || common == target.len() {
                continue; // an ancestor or a descendant
            }
            named += 1;
            graphs
                .entry(module[..common].to_vec())
                .or_default()
                .entry(module[common].clone())
                .or_default()
                .insert(target[common].clone());
        }
    }
    assert!(named > 20, "the test reads the imports ({named} found)");
    let top = &graphs[&Vec::new()];
    assert!(top["vm"].contains("owner"), "vm uses the owner: {top:?}");
    assert!(
        top["owner"].contains("disk"),
        "the owner reads the disks: {top:?}"
    );
    for (parent, edges) in &graphs {
        if let Some(c) = cycle(edges) {
            panic!(
                "an import circle among the modules of crate::{}: {}",
                parent.join("::"),
                c.join(" -> ")
            );
        }
    }
}

#[test]
fn use_trees_expand() {
    let got = use_tree("a::{b, c::{d, e}}, f");
    assert_eq!(
        got,
        [vec!["a", "b"], vec!["a", "c", "d"], vec!["a", "c", "e"]]
            .iter()
            .map(|p| p.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .collect::<Vec<_>>()
    );
}
