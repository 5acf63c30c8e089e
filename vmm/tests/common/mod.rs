//! Tiny test guests for the machine's tests, and a disk served by its worker.

pub mod rig;

/// Where a tiny guest's code is loaded and starts.
pub const ENTRY: u64 = 0x100_0000;
/// Where the counting guest counts.
#[allow(dead_code)]
pub const COUNTER: u64 = 0x200_0000;

#[allow(dead_code)]
/// A static ELF whose code is `loop: inc qword [COUNTER]; jmp loop`.
pub fn counting_guest() -> Vec<u8> {
    let mut code = vec![0x48, 0xff, 0x04, 0x25];
    code.extend_from_slice(&(COUNTER as u32).to_le_bytes());
    code.extend_from_slice(&[0xeb, 0xf6]);
    elf(&code)
}

/// A static ELF loading `code` at ENTRY and starting there.
pub fn elf(code: &[u8]) -> Vec<u8> {
    let mut elf = Vec::new();
    elf.extend_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    elf.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    elf.extend_from_slice(&62u16.to_le_bytes()); // x86-64
    elf.extend_from_slice(&1u32.to_le_bytes());
    elf.extend_from_slice(&ENTRY.to_le_bytes());
    elf.extend_from_slice(&64u64.to_le_bytes()); // program headers right after
    elf.extend_from_slice(&0u64.to_le_bytes());
    elf.extend_from_slice(&0u32.to_le_bytes());
    for v in [64u16, 56, 1, 64, 0, 0] {
        elf.extend_from_slice(&v.to_le_bytes());
    }
    elf.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    elf.extend_from_slice(&5u32.to_le_bytes()); // R+X
    elf.extend_from_slice(&120u64.to_le_bytes());
    elf.extend_from_slice(&ENTRY.to_le_bytes());
    elf.extend_from_slice(&ENTRY.to_le_bytes());
    elf.extend_from_slice(&(code.len() as u64).to_le_bytes());
    elf.extend_from_slice(&(code.len() as u64).to_le_bytes());
    elf.extend_from_slice(&0x1000u64.to_le_bytes());
    assert_eq!(elf.len(), 120);
    elf.extend_from_slice(code);
    elf
}

/// Whether /dev/kvm is here; without it a test may only skip when
/// HOLDFAST_SKIP_KVM_TESTS is set (so a CI host that lost KVM fails loudly).
#[allow(dead_code)]
pub fn kvm_available() -> bool {
    if std::path::Path::new("/dev/kvm").exists() {
        return true;
    }
    assert!(
        std::env::var_os("HOLDFAST_SKIP_KVM_TESTS").is_some(),
        "/dev/kvm is missing: this test needs KVM (HOLDFAST_SKIP_KVM_TESTS=1 skips it)"
    );
    eprintln!("skipped: no /dev/kvm");
    false
}

/// A one-vCPU, 128 MiB machine running the counting guest (written into `dir`) with
/// `disk` as its one disk, id `data`, in memory.
#[allow(dead_code)]
pub fn counting_vm_config(
    dir: &std::path::Path,
    disk: holdfast_block::Disk<Box<dyn holdfast_block::Backend>>,
    faults: holdfast_block::FaultHandle,
) -> holdfast_vmm::vm::VmConfig {
    counting_vm_with_disks(
        dir,
        vec![holdfast_vmm::disk::DiskSpec {
            id: "data".into(),
            engine: Box::new(disk),
            path: "memory".into(),
            direct: false,
            faults: Some(faults),
            simulated: None,
            watch: Default::default(),
            hang_timeout: None,
            io_threads: holdfast_vmm::disk::CALLS_PER_DISK,
            write_log: None,
        }],
    )
}

/// The same machine with the disks given.
#[allow(dead_code)]
pub fn counting_vm_with_disks(
    dir: &std::path::Path,
    disks: Vec<holdfast_vmm::disk::DiskSpec>,
) -> holdfast_vmm::vm::VmConfig {
    let kernel = dir.join("counting.elf");
    std::fs::write(&kernel, counting_guest()).expect("guest");
    holdfast_vmm::vm::VmConfig {
        kernel,
        initrd: None,
        cmdline: "none".into(),
        cpus: 1,
        mem: 128 << 20,
        disks,
        serial: Box::new(std::io::sink()),
        name: None,
    }
}

/// `holdfast run` with `kernel`, 128 MiB and no serial console; add the rest.
#[allow(dead_code)]
pub fn holdfast_run(kernel: &std::path::Path) -> std::process::Command {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_holdfast"));
    c.args(["run", "--kernel"])
        .arg(kernel)
        .args(["--mem", "128M", "--serial", "none"]);
    c
}

/// The run-state owner running a started machine in its own thread, driven as the
/// QMP bridge drives it, with every event it sends kept.
#[allow(dead_code)]
pub struct OwnerThread {
    pub tx: std::sync::mpsc::Sender<holdfast_vmm::owner::Input>,
    pub events: tokio::sync::broadcast::Receiver<String>,
    owner: Option<std::thread::JoinHandle<holdfast_vmm::owner::Exit>>,
}

#[allow(dead_code)]
impl OwnerThread {
    /// The machine `start` builds, sending its inputs to the owner's inbox.
    pub fn start(start: impl FnOnce(holdfast_vmm::owner::Inbox) -> holdfast_vmm::vm::Vm) -> Self {
        let (tx, inputs) = holdfast_vmm::owner::inbox::inbox();
        let mut vm = start(tx.clone());
        let sink = holdfast_qmp::EventSink::new();
        let events = sink.subscribe();
        let owner = std::thread::spawn(move || {
            let exit = holdfast_vmm::owner::run(&mut vm, &inputs, &sink);
            vm.shutdown();
            exit
        });
        OwnerThread {
            tx,
            events,
            owner: Some(owner),
        }
    }

    pub fn qmp(&self, command: &str) -> Result<serde_json::Value, holdfast_qmp::QmpError> {
        self.call(command, serde_json::json!({}))
    }

    pub fn call(
        &self,
        command: &str,
        args: serde_json::Value,
    ) -> Result<serde_json::Value, holdfast_qmp::QmpError> {
        let serde_json::Value::Object(args) = args else {
            panic!("arguments are an object")
        };
        // Parsed at the edge, as the QMP bridge does.
        let command = holdfast_vmm::owner::Command::parse(command, &holdfast_qmp::Args(args))?;
        let (reply, answer) = std::sync::mpsc::channel();
        self.tx
            .send(holdfast_vmm::owner::Input::Qmp { command, reply })
            .expect("owner alive");
        answer
            .recv_timeout(std::time::Duration::from_secs(20))
            .expect("the owner answers")
    }

    /// The events sent since the last look, in order.
    pub fn events(&mut self) -> Vec<serde_json::Value> {
        std::iter::from_fn(|| self.events.try_recv().ok())
            .map(|t| serde_json::from_str(&t).expect("JSON"))
            .collect()
    }

    /// The names of the events sent since the last look, in order.
    pub fn event_names(&mut self) -> Vec<String> {
        self.events()
            .iter()
            .map(|v| v["event"].as_str().unwrap_or("").to_owned())
            .collect()
    }

    /// How the owner ended (once; the events it sent stay readable).
    pub fn join(&mut self) -> holdfast_vmm::owner::Exit {
        self.owner
            .take()
            .expect("joined once")
            .join()
            .expect("the owner thread")
    }
}

/// Runs the `holdfast` binary with `args`: (exit status, stdout, stderr).
#[allow(dead_code)]
pub fn holdfast_output(args: &[&str]) -> (i32, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_holdfast"))
        .args(args)
        .output()
        .expect("run holdfast");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
