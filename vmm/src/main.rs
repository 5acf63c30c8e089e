//! The `holdfast` command.

use std::process::ExitCode;

use holdfast_block::{Backend, Disk, ErrorAction, FileBackend, FileOptions};
use holdfast_vmm::cli::{self, RunOpts, SerialOut};
use holdfast_vmm::vm::{error_chain, DiskSpec, Exit, Vm, VmConfig, VmEvent};

const HELP: &str = "\
holdfast: a KVM virtual machine monitor whose virtio-blk disks survive host storage
outages without losing a byte.

Usage: holdfast <command> [options]

Commands:
  run        boot a guest (holdfast run --help)
  help       print this text

To rerun storage outages against QEMU-like strategies on simulated host file systems:
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
        Some("run") => match cli::parse_run(&args[1..]) {
            Ok(None) => {
                print!("{}", cli::RUN_HELP);
                ExitCode::SUCCESS
            }
            Ok(Some(opts)) => run(opts),
            Err(e) => {
                eprintln!("holdfast run: {e}");
                ExitCode::from(2)
            }
        },
        Some(other) => {
            eprintln!("holdfast: unknown command `{other}` (see `holdfast --help`)");
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
    if !hardware_virtualization() {
        eprintln!(
            "holdfast: warning: this host's CPUs show no VT-x/AMD-V (no vmx or svm flag in /proc/cpuinfo): \
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
    let mut disks = Vec::new();
    for d in &opts.disks {
        let options = FileOptions {
            read_only: d.config.read_only,
            direct: d.direct,
        };
        match FileBackend::open(&d.path, options) {
            Ok(f) => {
                let backend: Box<dyn Backend> = Box::new(f);
                disks.push(DiskSpec {
                    id: d.id.clone(),
                    disk: Disk::new(backend, d.config.clone()),
                });
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
    };
    let mut vm = match Vm::start(config) {
        Ok(vm) => vm,
        Err(e) => {
            eprintln!("holdfast run: {}", error_chain(&e));
            return ExitCode::from(1);
        }
    };
    let exit = own_run_state(&mut vm);
    let dropped = vm.shutdown();
    for (disk, bytes, error) in &dropped {
        eprintln!("holdfast: disk {disk}: {bytes} unflushed bytes dropped ({error})");
    }
    match exit {
        Exit::Poweroff if dropped.is_empty() => ExitCode::SUCCESS,
        Exit::Reboot if dropped.is_empty() => {
            eprintln!("holdfast: the guest rebooted; holdfast exits instead of resetting it");
            ExitCode::SUCCESS
        }
        Exit::Poweroff | Exit::Reboot => ExitCode::from(1),
        Exit::GuestPanic => {
            eprintln!("holdfast: the guest panicked");
            ExitCode::from(3)
        }
        Exit::EmulationFailure { cpu } => {
            eprintln!(
                "holdfast: vCPU {cpu} stopped: this host's KVM could not run the guest's kernel code \
                 (KVM internal error: emulation failure). On hosts whose /dev/kvm emulates guest \
                 kernel code instead of running it (no VT-x/AMD-V, e.g. kvm_pvm), run holdfast inside \
                 the nested test host instead: tests/testhost (see ../shared/TESTHOST.md)."
            );
            ExitCode::from(4)
        }
        Exit::Failed(message) => {
            eprintln!("holdfast: {message}");
            ExitCode::from(1)
        }
    }
}

/// The run-state owner's loop: the only place the machine's state changes.
fn own_run_state(vm: &mut Vm) -> Exit {
    loop {
        let Some(event) = vm.next_event() else {
            return Exit::Failed("every vCPU is gone".into());
        };
        match event {
            VmEvent::Poweroff => return Exit::Poweroff,
            VmEvent::Reboot => return Exit::Reboot,
            VmEvent::GuestPanic => return Exit::GuestPanic,
            VmEvent::EmulationFailure { cpu } => return Exit::EmulationFailure { cpu },
            VmEvent::VcpuFailed { cpu, message } => {
                return Exit::Failed(format!("vCPU {cpu}: {message}"))
            }
            VmEvent::DiskError { disk, report } => {
                eprintln!(
                    "holdfast: disk {disk}: {} (action: {})",
                    report.error,
                    report.action.as_str()
                );
                if report.action == ErrorAction::Stop {
                    vm.pause();
                    eprintln!(
                        "holdfast: the VM is paused (io-error); its unflushed writes are kept. \
                         Resuming needs QMP `cont`, which is not built yet."
                    );
                }
            }
        }
    }
}
