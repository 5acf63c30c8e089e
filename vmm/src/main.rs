//! The `holdfast` command.

use std::process::ExitCode;

const HELP: &str = "\
holdfast: a KVM virtual machine monitor whose virtio-blk disks survive host storage
outages without losing a byte.

Usage: holdfast <command> [options]

Commands:
  run        boot a guest (not available yet: the machine is still being built)
  help       print this text

What works today is the durability engine, in the holdfast-block crate. To see it
rerun storage outages against QEMU-like strategies on simulated host file systems:
  cargo run --release -p holdfast-block --example outage-matrix

Options:
  -h, --help       print this text
  -V, --version    print the version
";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        None | Some("help" | "-h" | "--help") => {
            print!("{HELP}");
            ExitCode::SUCCESS
        }
        Some("-V" | "--version") => {
            println!("holdfast {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Some("run") => {
            eprintln!(
                "holdfast run: booting guests is not implemented yet; \
                 the outage matrix shows the disk engine: \
                 cargo run --release -p holdfast-block --example outage-matrix"
            );
            ExitCode::from(2)
        }
        Some(other) => {
            eprintln!("holdfast: unknown command `{other}` (see `holdfast --help`)");
            ExitCode::from(2)
        }
    }
}
