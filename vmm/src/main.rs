//! The `holdfast` command.

use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};
use holdfast_block::sim::HostCache;
use holdfast_block::{Backend, FaultInjector, FaultPlan, FileBackend, FileOptions};
use holdfast_qmp::{EventSink, Machine, Server};
use holdfast_vmm::cli::{CliExit, RunOpts, SerialOut};
use holdfast_vmm::disk::{DiskSpec, SimulatedHost};
use holdfast_vmm::host_signals;
use holdfast_vmm::owner::{self, Exit, QmpBridge};
use holdfast_vmm::vm::{error_chain, Vm, VmConfig};

/// holdfast: a KVM virtual machine monitor whose virtio-blk disks survive host
/// storage outages without losing a byte.
#[derive(Debug, Parser)]
#[command(
    name = "holdfast",
    version,
    about = "A KVM virtual machine monitor whose virtio-blk disks survive host storage \
             outages without losing a byte",
    after_help = TOP_AFTER_HELP
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

const TOP_AFTER_HELP: &str = "\
What holdfast promises a guest's data through host storage outages, and what the
operator does when the host file system itself goes down: docs/durability.md.

To rerun storage outages against QEMU-like strategies on simulated host file systems:
  holdfast lab images/lab/matrix.json";

/// holdfast's commands.
#[derive(Debug, Subcommand)]
enum Command {
    /// Boot a guest on KVM whose disks survive host storage outages
    Run(holdfast_vmm::cli::RunArgs),
    /// Rerun host storage outages from a scenario file and report what the guest kept
    Lab(holdfast_vmm::lab::LabArgs),
    /// Talk to a QMP server (holdfast's or QEMU's): one command, the events, or a shell
    Qmp(holdfast_vmm::qmp_command::QmpArgs),
    /// Check a fault plan (--disk ...,faults=FILE); --help explains the format
    Faults(holdfast_vmm::cli::FaultsArgs),
    /// Print the man page of holdfast or of one of its commands (roff: | man -l -)
    Man {
        /// A command (run, lab, faults, ...); holdfast itself if none
        command: Option<String>,
    },
    /// Print shell completions for holdfast (bash, zsh, fish, elvish, powershell)
    Completions {
        /// The shell
        shell: clap_complete::Shell,
    },
}

impl Cli {
    /// Parses `args` (the first is the program's name); a help or version request, or
    /// a bad command line, is an [`CliExit`] with what to print.
    fn parse_args<I, T>(args: I) -> Result<Cli, CliExit>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        Cli::try_parse_from(args).map_err(CliExit::from_clap)
    }

    /// The man page of holdfast, or of its command `name`.
    fn man(name: Option<&str>) -> Result<Vec<u8>, String> {
        let top = Cli::command();
        let command = match name {
            None => top,
            Some(n) => {
                let sub = top
                    .get_subcommands()
                    .find(|c| c.get_name() == n)
                    .cloned()
                    .ok_or(format!("man: no command `{n}` (see holdfast --help)"))?;
                sub.name(format!("holdfast-{n}"))
                    .version(env!("CARGO_PKG_VERSION"))
            }
        };
        let mut out = Vec::new();
        clap_mangen::Man::new(command)
            .render(&mut out)
            .map_err(|e| format!("man: {e}"))?;
        Ok(out)
    }

    /// Completions for `shell`.
    fn completions(shell: clap_complete::Shell) -> Vec<u8> {
        let mut out = Vec::new();
        clap_complete::generate(shell, &mut Cli::command(), "holdfast", &mut out);
        out
    }
}

fn main() -> ExitCode {
    let cli = match Cli::parse_args(std::env::args_os()) {
        Ok(cli) => cli,
        Err(CliExit { text, ok: true }) => return write_out(text.as_bytes()),
        Err(CliExit { text, ok: false }) => {
            let command = std::env::args()
                .nth(1)
                .filter(|c| Cli::command().find_subcommand(c).is_some());
            let who = command.map_or("holdfast".to_owned(), |c| format!("holdfast {c}"));
            eprint!("{who}: {}", text.trim_start_matches("error: "));
            return ExitCode::from(2);
        }
    };
    match cli.command {
        None => write_out(Cli::command().render_help().to_string().as_bytes()),
        Some(Command::Run(args)) => match args.check() {
            Ok(opts) => run(opts),
            Err(e) => {
                eprintln!("holdfast run: {e}");
                ExitCode::from(2)
            }
        },
        Some(Command::Lab(args)) => holdfast_vmm::lab::main(args),
        Some(Command::Faults(args)) => faults(args),
        Some(Command::Qmp(args)) => holdfast_vmm::qmp_command::main(args),
        Some(Command::Man { command }) => match Cli::man(command.as_deref()) {
            Ok(page) => write_out(&page),
            Err(e) => {
                eprintln!("holdfast {e}");
                ExitCode::from(2)
            }
        },
        Some(Command::Completions { shell }) => write_out(&Cli::completions(shell)),
    }
}

fn write_out(bytes: &[u8]) -> ExitCode {
    use std::io::Write;
    match std::io::stdout().write_all(bytes) {
        Ok(()) => ExitCode::SUCCESS,
        Err(_) => ExitCode::from(1),
    }
}

/// `holdfast faults [PLAN]`: checks a plan and lists its rules.
fn faults(args: holdfast_vmm::cli::FaultsArgs) -> ExitCode {
    let Some(path) = args.plan else {
        return write_out(format!("{}\n", holdfast_block::fault::PLAN_HELP).as_bytes());
    };
    match FaultPlan::load(&path) {
        Ok(plan) => {
            let mut out = format!(
                "{}: ok, {} rule(s){}\n",
                path.display(),
                plan.rules.len(),
                plan.seed.map_or(String::new(), |s| format!(", seed {s}"))
            );
            for (i, rule) in plan.seeded_rules().iter().enumerate() {
                out.push_str(&format!("  rules[{i}]: {rule}\n"));
            }
            write_out(out.as_bytes())
        }
        Err(e) => {
            eprintln!("holdfast faults: {}: {}", path.display(), error_chain(&e));
            ExitCode::from(2)
        }
    }
}

/// Whether this host's CPUs advertise hardware virtualization.
fn hardware_virtualization() -> bool {
    std::fs::read_to_string("/proc/cpuinfo")
        .map(|c| c.split_whitespace().any(|w| w == "vmx" || w == "svm"))
        .unwrap_or(true)
}

fn run(opts: RunOpts) -> ExitCode {
    holdfast_vmm::logging::init();
    // Before any thread starts, so that every thread inherits the mask.
    if let Err(e) = host_signals::block_termination_signals() {
        eprintln!("holdfast run: cannot block SIGTERM/SIGINT/SIGHUP: {e}");
        return ExitCode::from(1);
    }
    if !hardware_virtualization() {
        log::warn!(
            "this host's CPUs show no VT-x/AMD-V (no vmx or svm flag in /proc/cpuinfo): \
             its KVM emulates guest kernel code about 1000x slower, and a stock kernel crawls and then stops \
             with an emulation failure. Run the guest in the nested test host instead (tests/e2e)."
        );
    }
    let serial: Box<dyn std::io::Write + Send> = match &opts.serial {
        SerialOut::Stdio => Box::new(std::io::stdout()),
        SerialOut::None => Box::new(std::io::sink()),
        SerialOut::File(p) => match std::fs::File::create(p) {
            Ok(f) => Box::new(f),
            Err(e) => {
                eprintln!("holdfast run: --serial file:{}: {e}", p.display());
                return ExitCode::from(2);
            }
        },
    };
    let (serial, console) = holdfast_vmm::console::Tap::new(serial);
    let serial: Box<dyn std::io::Write + Send> = Box::new(serial);
    let mut disks = Vec::new();
    for d in &opts.disks {
        let options = FileOptions {
            read_only: d.config.read_only,
            direct: d.direct,
            direct_align: d.direct_align,
        };
        match FileBackend::open(&d.path, options) {
            Ok(f) => {
                if let Some(a) = f.direct_align() {
                    log::info!(
                        "disk {}: O_DIRECT calls aligned to {} bytes{}; writes of less are \
                         read-modify-writes, run one at a time per block",
                        d.id,
                        a.offset,
                        if d.direct_align.is_some() {
                            " (x-direct-align)"
                        } else {
                            ""
                        }
                    );
                }
                // Every disk has a fault-injection point (x-block-fault); with no rule
                // armed it costs one uncontended lock per host call.
                let (backend, faults, simulated) = match d.simulated {
                    None => {
                        let injector = FaultInjector::new(f);
                        let faults = injector.handle();
                        (Box::new(injector) as Box<dyn Backend>, faults, None)
                    }
                    Some(model) => {
                        // engine -> calls -> page cache -> write-back -> image
                        let below = FaultInjector::new(f);
                        let writeback = below.handle();
                        let cache = HostCache::new(model, below);
                        let evicting = cache.clone();
                        let injector = FaultInjector::new(cache);
                        let faults = injector.handle();
                        let simulated = SimulatedHost {
                            model,
                            writeback,
                            evict: std::sync::Arc::new(move || evicting.evict()),
                        };
                        (
                            Box::new(injector) as Box<dyn Backend>,
                            faults,
                            Some(simulated),
                        )
                    }
                };
                if let Some(plan) = &d.faults {
                    let ids = faults.arm_plan(plan);
                    log::info!(
                        "disk {}: fault plan armed: {} rule(s) in front of the image",
                        d.id,
                        ids.len()
                    );
                }
                let (strategy, config) = (d.strategy, d.config.clone());
                let mut spec =
                    DiskSpec::with_engine(&d.id, backend, &d.path.display().to_string(), |b| {
                        strategy.engine(b, config)
                    });
                spec.direct = d.direct;
                spec.faults = Some(faults);
                spec.simulated = simulated;
                spec.hang_timeout = d.hang_timeout;
                if let Some(path) = &d.write_log {
                    match holdfast_block::WriteLog::create(path) {
                        Ok(log) => spec.write_log = Some(log),
                        Err(e) => {
                            eprintln!(
                                "holdfast run: --disk {}: write-log: cannot create {}: {e}",
                                d.id,
                                path.display()
                            );
                            return ExitCode::from(2);
                        }
                    }
                }
                disks.push(spec);
            }
            Err(e) => {
                eprintln!("holdfast run: --disk {}: {}", d.id, error_chain(&e));
                return ExitCode::from(2);
            }
        }
    }
    let config = VmConfig {
        kernel: opts.kernel,
        initrd: opts.initrd,
        cmdline: opts.cmdline,
        cpus: opts.cpus,
        mem: opts.mem,
        disks,
        serial,
        name: opts.name.clone(),
    };
    // The QMP socket first: a bad --qmp fails before the guest starts.
    let qmp = match &opts.qmp {
        None => None,
        Some(path) => {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("holdfast run: --qmp: cannot start its runtime: {e}");
                    return ExitCode::from(1);
                }
            };
            let server = {
                let _guard = rt.enter();
                Server::bind(path)
            };
            match server {
                Ok(server) => Some((rt, server)),
                Err(e) => {
                    eprintln!("holdfast run: {}", error_chain(&e));
                    return ExitCode::from(2);
                }
            }
        }
    };
    let (inbox, inputs) = owner::inbox::inbox();
    let mut vm = match Vm::start(config, inbox.clone()) {
        Ok(vm) => vm,
        Err(e) => {
            eprintln!("holdfast run: {}", error_chain(&e));
            return ExitCode::from(1);
        }
    };
    if let Err(e) = host_signals::forward_termination_signals(inbox.clone()) {
        eprintln!("holdfast run: cannot start the signal thread: {e}");
        return ExitCode::from(1);
    }
    if let Some(limit) = opts.boot_timeout {
        let (inbox, console) = (inbox.clone(), console.clone());
        let watcher = std::thread::Builder::new()
            .name("boot-timeout".into())
            .spawn(move || {
                // The owner decides on the guest's running time (pauses do not count):
                // asked each second from the limit on, until init starts or it ends.
                std::thread::sleep(limit);
                while !console.init_started() {
                    let asked = inbox.send(owner::Input::BootTimeout {
                        seconds: limit.as_secs(),
                    });
                    if asked.is_err() {
                        return;
                    }
                    std::thread::sleep(std::time::Duration::from_secs(1));
                }
            });
        if let Err(e) = watcher {
            eprintln!("holdfast run: cannot start the boot-timeout thread: {e}");
            return ExitCode::from(1);
        }
    }
    let events = EventSink::new();
    if let Some((rt, server)) = qmp {
        let bridge: std::sync::Arc<dyn Machine> =
            std::sync::Arc::new(QmpBridge(std::sync::Mutex::new(inbox.clone())));
        let sink = events.clone();
        let spawned = std::thread::Builder::new()
            .name("qmp".into())
            .spawn(move || rt.block_on(server.serve(bridge, sink)));
        if let Err(e) = spawned {
            eprintln!("holdfast run: --qmp: cannot start its thread: {e}");
            return ExitCode::from(1);
        }
    }
    holdfast_vmm::panics::report_panics_to(inbox);
    // The owner's own panic: reported by the hook; the disks are settled below.
    let exit = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        owner::run(&mut vm, &inputs, &events)
    }))
    .unwrap_or_else(|_| Exit::Failed("the run-state owner panicked".into()));
    // Let QMP clients have the last reply and events (a quit's X_UNFLUSHED_DROPPED
    // and SHUTDOWN) before the process ends; a client that does not read gets 2 s.
    if opts.qmp.is_some() && !events.finish(std::time::Duration::from_secs(2)) {
        log::warn!("a QMP client did not take its last events within 2 s");
    }
    let reported = vm.reported_dropped().to_vec();
    let mut dropped = vm.shutdown();
    for d in &dropped {
        log::error!(
            "disk {}: {} unflushed bytes dropped ({})",
            d.disk,
            d.bytes,
            d.why
        );
    }
    // What QMP clients were told was dropped counts as dropped for the exit status,
    // even where a hung call returned in time for the last flush to write it.
    for r in reported {
        if !dropped.iter().any(|d| d.disk == r.disk) {
            log::warn!(
                "disk {}: the {} bytes reported dropped (X_UNFLUSHED_DROPPED) reached stable \
                 storage after all, once its host call returned; exiting 1 as reported",
                r.disk,
                r.bytes
            );
            dropped.push(r);
        }
    }
    // A guest without pvpanic that panics with panic=-1 reboots: its console says why.
    let exit = match exit {
        Exit::Reboot | Exit::Poweroff if console.panicked() => Exit::GuestPanic,
        other => other,
    };
    let last_lines = || {
        eprintln!("holdfast run: the console's last lines:");
        for line in console.last_lines() {
            eprintln!("  | {line}");
        }
    };
    match exit {
        _ if !dropped.is_empty() => {
            last_lines();
            if let Exit::Failed(message) = &exit {
                log::error!("{message}");
            }
            log::error!(
                "exiting 6: acknowledged bytes were dropped ({exit:?}; the guest's own status, if \
                 any, is not the exit status)"
            );
            ExitCode::from(6)
        }
        Exit::Failed(message) => {
            log::error!("exiting 1: {message}");
            ExitCode::from(1)
        }
        Exit::EmulationFailure { cpu } => {
            log::error!(
                "exiting 4: vCPU {cpu} stopped: this host's KVM could not run the guest's kernel code \
                 (KVM internal error: emulation failure). On hosts whose /dev/kvm emulates guest \
                 kernel code instead of running it (no VT-x/AMD-V, e.g. kvm_pvm), run holdfast inside \
                 the nested test host instead: tests/testhost (README.md)."
            );
            ExitCode::from(4)
        }
        Exit::GuestPanic => {
            last_lines();
            log::error!("exiting 3: the guest panicked");
            ExitCode::from(3)
        }
        Exit::BootTimeout { seconds } => {
            last_lines();
            log::error!(
                "exiting 5: the kernel did not start the guest's init within {seconds} s \
                 (--boot-timeout; it says \"Run /init as init process\" on the console unless \
                 the command line has quiet or a low loglevel)"
            );
            ExitCode::from(5)
        }
        Exit::GuestStatus(status) => {
            log::info!("exiting {status}: the guest's status (the debug-exit port)");
            ExitCode::from(status)
        }
        Exit::Poweroff => {
            log::info!("exiting 0: the guest powered off");
            ExitCode::SUCCESS
        }
        Exit::Quit => {
            log::info!("exiting 0: QMP quit; every disk's buffered bytes are on stable storage");
            ExitCode::SUCCESS
        }
        Exit::Reboot => {
            log::info!("exiting 0: the guest rebooted (or system_reset); holdfast exits instead of resetting it");
            ExitCode::SUCCESS
        }
        Exit::Signal(name) => {
            log::info!(
                "exiting 0: ended by {name}; every disk's buffered bytes are on stable storage"
            );
            ExitCode::SUCCESS
        }
    }
}
