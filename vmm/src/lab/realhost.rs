//! The `real` host: the run's images on a real host file system (ext4, made with its
//! defaults) on a device-mapper device over a loop device over a sparse file in the
//! run's folder, so that an outage is a dm table swap to `error` and the host's own
//! kernel decides what its page cache and file system do. Needs root. Everything it
//! makes it names when it makes it, and removes when dropped.

use std::path::{Path, PathBuf};
use std::process::Command;

/// What went wrong with the real host.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file of its own.
    #[error("{}: {source}", path.display())]
    File {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A tool it runs could not start.
    #[error("cannot start {program}: {source}")]
    Start {
        program: String,
        #[source]
        source: std::io::Error,
    },
    /// A tool failed (dmsetup, mke2fs, mount, umount).
    #[error("{command}: {status} {stderr}")]
    Tool {
        command: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
    /// A call into the kernel (loop devices, fallocate).
    #[error("{call}: {source}")]
    Kernel {
        call: String,
        #[source]
        source: std::io::Error,
    },
    #[error("no free loop device")]
    NoLoopDevice,
    /// Its file system went down and its repair failed.
    #[error("host ext4 went down; e2fsck -fy exited {0}: it could not repair it")]
    Unrepaired(i32),
}

impl Error {
    /// An I/O error on `path`.
    fn file(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
        let path = path.into();
        move |source| Error::File { path, source }
    }
}

/// What this machine lacks for the real host.
#[derive(Debug, thiserror::Error)]
pub enum Preflight {
    #[error("needs root (it makes a loop device, a device-mapper device and a mount)")]
    NotRoot,
    #[error("needs `{0}`, which is not installed here")]
    NoTool(&'static str),
    #[error("needs the kernel's device-mapper (dmsetup version fails: modprobe dm-mod)")]
    NoDeviceMapper,
    #[error("needs loop devices (/dev/loop-control is missing: modprobe loop)")]
    NoLoopDevices,
}

/// `LOOP_CTL_GET_FREE`, `LOOP_SET_FD`, `LOOP_CLR_FD` (linux/loop.h).
const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;
const LOOP_SET_FD: libc::c_ulong = 0x4C00;
const LOOP_CLR_FD: libc::c_ulong = 0x4C01;

/// Runs a host tool; its output, or how it failed.
fn run(program: &str, args: &[&str]) -> Result<String, Error> {
    let out = Command::new(program)
        .args(args)
        .env("DM_DISABLE_UDEV", "1")
        .output()
        .map_err(|source| Error::Start {
            program: program.to_owned(),
            source,
        })?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(Error::Tool {
            command: format!("{program} {}", args.join(" ")),
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

/// Whether this process may make loop and dm devices (root), and the tools exist.
pub fn preflight() -> Result<(), Preflight> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(Preflight::NotRoot);
    }
    for tool in ["dmsetup", "mke2fs", "mount", "umount"] {
        let found = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
            .unwrap_or(false);
        if !found {
            return Err(Preflight::NoTool(tool));
        }
    }
    if run("dmsetup", &["version"]).is_err() {
        return Err(Preflight::NoDeviceMapper);
    }
    if !Path::new("/dev/loop-control").exists() {
        return Err(Preflight::NoLoopDevices);
    }
    Ok(())
}

/// A host file system for one run. Dropping it unmounts and removes what it made.
#[derive(Debug)]
pub struct RealHost {
    /// Kernel log lines seen before the host was made (`dmesg`): later ones are its.
    klog_mark: usize,
    backing: PathBuf,
    loop_dev: Option<String>,
    dm_name: Option<String>,
    sectors: u64,
    mnt: PathBuf,
    mounted: std::cell::Cell<bool>,
    /// Keep the backing file when dropped (a run that lost something).
    keep: bool,
}

impl RealHost {
    /// Makes a `size`-byte ext4 host in `dir` and mounts it at `dir/host`.
    pub fn set_up(dir: &Path, size: u64, tag: &str) -> Result<RealHost, Error> {
        let backing = dir.join("host-device.img");
        // Read and write: the loop device does both through this descriptor.
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&backing)
            .map_err(Error::file(&backing))?;
        f.set_len(size).map_err(Error::file(&backing))?;
        let mut host = RealHost {
            klog_mark: kernel_log().lines().count(),
            backing,
            loop_dev: None,
            dm_name: None,
            sectors: size / 512,
            mnt: dir.join("host"),
            mounted: std::cell::Cell::new(false),
            keep: false,
        };
        host.loop_dev = Some(attach_loop(&f)?);
        let loop_dev = host.loop_dev.clone().unwrap_or_default();
        let name = format!("holdfast-lab-{}-{tag}", std::process::id());
        run(
            "dmsetup",
            &[
                "create",
                &name,
                "--table",
                &format!("0 {} linear {loop_dev} 0", host.sectors),
            ],
        )?;
        host.dm_name = Some(name.clone());
        let dev = format!("/dev/mapper/{name}");
        run("mke2fs", &["-q", "-t", "ext4", "-F", &dev])?;
        std::fs::create_dir_all(&host.mnt).map_err(Error::file(&host.mnt))?;
        run("mount", &["-t", "ext4", &dev, &host.mnt.to_string_lossy()])?;
        host.mounted.set(true);
        eprintln!(
            "lab: real host: ext4 (default options) on dm {name} over {loop_dev} over {}, mounted at {}",
            host.backing.display(),
            host.mnt.display()
        );
        Ok(host)
    }

    /// Keeps the backing file (the host file system with the images) when dropped.
    pub fn keep(&mut self) {
        self.keep = true;
    }

    pub fn mount_point(&self) -> &Path {
        &self.mnt
    }

    /// The dm device's name (made in `set_up`, gone only when dropped).
    fn dm_name(&self) -> &str {
        self.dm_name.as_deref().unwrap_or_default()
    }

    fn swap(&self, table: &str) -> Result<(), Error> {
        let name = self.dm_name();
        run("dmsetup", &["suspend", "--nolockfs", name])?;
        let loaded = run(
            "dmsetup",
            &[
                "load",
                name,
                "--table",
                &format!("0 {} {table}", self.sectors),
            ],
        );
        run("dmsetup", &["resume", name])?;
        loaded.map(|_| ())
    }

    /// Every I/O to the host device fails (EIO) from now on.
    pub fn break_device(&self) -> Result<(), Error> {
        self.swap("error")
    }

    /// Every I/O to the host device waits from now on (a suspended dm table with
    /// `--noflush`: what a hard NFS mount or a lost iSCSI path does), until
    /// [`RealHost::resume_device`].
    pub fn hang_device(&self) -> Result<(), Error> {
        let name = self.dm_name();
        run("dmsetup", &["suspend", "--noflush", "--nolockfs", name]).map(|_| ())
    }

    /// I/O flows again after [`RealHost::hang_device`].
    pub fn resume_device(&self) -> Result<(), Error> {
        let name = self.dm_name();
        run("dmsetup", &["resume", name]).map(|_| ())
    }

    /// The host file system is full: a file takes every block it has free (as root
    /// takes them: the blocks ext4 reserves for root too), so that a write into a
    /// hole of an image fails with ENOSPC, as on a thin volume or a shared file
    /// system that filled up. Returns the bytes it took.
    pub fn fill_up(&self) -> Result<u64, Error> {
        use std::os::fd::AsRawFd;
        let path = self.filler();
        let f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .map_err(Error::file(&path))?;
        // Large steps first, then smaller ones for what the extent tree leaves.
        let mut taken: u64 = 0;
        let mut step: u64 = 1 << 30;
        while step >= 4096 {
            // SAFETY: fallocate on a descriptor we own, with no buffers.
            let r = unsafe { libc::fallocate(f.as_raw_fd(), 0, taken as i64, step as i64) };
            if r == 0 {
                taken += step;
                continue;
            }
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::ENOSPC) {
                return Err(Error::Kernel {
                    call: format!("fallocate {}", path.display()),
                    source: e,
                });
            }
            step /= 2;
        }
        f.sync_all().map_err(Error::file(&path))?;
        Ok(taken)
    }

    /// Frees what [`RealHost::fill_up`] took.
    pub fn free_up(&self) -> Result<(), Error> {
        let path = self.filler();
        std::fs::remove_file(&path).map_err(Error::file(&path))
    }

    fn filler(&self) -> PathBuf {
        self.mnt.join("lab-filler")
    }

    /// The device works again.
    pub fn repair_device(&self) -> Result<(), Error> {
        let loop_dev = self.loop_dev.as_deref().unwrap_or_default();
        self.swap(&format!("linear {loop_dev} 0"))
    }

    /// What the kernel said since the host was made about its file system going down
    /// (ext4's journal abort, its remount read-only).
    pub fn down_messages(&self) -> Vec<String> {
        kernel_log()
            .lines()
            .skip(self.klog_mark)
            .filter(|l| {
                [
                    "Aborting journal",
                    "Remounting filesystem read-only",
                    "shut down",
                    "forced readonly",
                ]
                .iter()
                .any(|m| l.contains(m))
            })
            .map(str::to_string)
            .collect()
    }

    /// Whether the host file system refuses writes (ext4 aborted its journal and went
    /// read-only) although its device may work again.
    pub fn fs_down(&self) -> bool {
        let probe = self.mnt.join(".lab-probe");
        let ok = std::fs::write(&probe, b"probe").is_ok() && std::fs::remove_file(&probe).is_ok();
        !ok
    }

    /// Unmounts (dropping its page cache), repairs with e2fsck if it went down, and
    /// mounts again: what the operator does after an outage, and what makes the
    /// check read what reached the device.
    pub fn remount(&self) -> Result<String, Error> {
        let down = self.fs_down();
        self.unmount()?;
        let dev = format!("/dev/mapper/{}", self.dm_name());
        let mut said = String::new();
        if down {
            // e2fsck exits 1 when it corrected errors.
            let out = Command::new("e2fsck")
                .args(["-fy", &dev])
                .output()
                .map_err(|source| Error::Start {
                    program: "e2fsck".into(),
                    source,
                })?;
            let code = out.status.code().unwrap_or(-1);
            if !(0..=2).contains(&code) {
                return Err(Error::Unrepaired(code));
            }
            said = format!("host ext4 went down; e2fsck -fy exited {code}");
        }
        run("mount", &["-t", "ext4", &dev, &self.mnt.to_string_lossy()])?;
        self.mounted.set(true);
        Ok(said)
    }

    fn unmount(&self) -> Result<(), Error> {
        if !self.mounted.get() {
            return Ok(());
        }
        let m = self.mnt.to_string_lossy().into_owned();
        // A VMM that just exited can hold an image for a moment longer.
        for _ in 0..20 {
            if run("umount", &[&m]).is_ok() {
                self.mounted.set(false);
                return Ok(());
            }
            std::thread::sleep(std::time::Duration::from_millis(500));
        }
        run("umount", &[&m]).map(|_| self.mounted.set(false))
    }
}

impl Drop for RealHost {
    fn drop(&mut self) {
        if self.unmount().is_err() {
            let _ = run("umount", &["-l", &self.mnt.to_string_lossy()]);
        }
        if let Some(name) = self.dm_name.take() {
            if let Err(e) = run("dmsetup", &["remove", &name]) {
                eprintln!("lab: could not remove dm device {name}: {e}");
            }
        }
        if let Some(dev) = self.loop_dev.take() {
            if let Err(e) = detach_loop(&dev) {
                eprintln!("lab: could not detach {dev}: {e}");
            }
        }
        if self.keep {
            eprintln!(
                "lab: kept the host device's contents (ext4 with the images) in {}",
                self.backing.display()
            );
        } else {
            let _ = std::fs::remove_file(&self.backing);
        }
    }
}

/// The kernel's log as `dmesg` prints it (empty if it cannot be read).
fn kernel_log() -> String {
    run("dmesg", &[]).unwrap_or_default()
}

fn attach_loop(file: &std::fs::File) -> Result<String, Error> {
    use std::os::fd::AsRawFd;
    let ctl = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/loop-control")
        .map_err(Error::file("/dev/loop-control"))?;
    // The free device may be taken by someone else between the two calls: try again.
    for _ in 0..10 {
        // SAFETY: LOOP_CTL_GET_FREE takes no argument and returns a device number.
        let n = unsafe { libc::ioctl(ctl.as_raw_fd(), LOOP_CTL_GET_FREE) };
        if n < 0 {
            return Err(Error::Kernel {
                call: "LOOP_CTL_GET_FREE".into(),
                source: std::io::Error::last_os_error(),
            });
        }
        let dev = format!("/dev/loop{n}");
        let Ok(lo) = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&dev)
        else {
            continue;
        };
        // SAFETY: LOOP_SET_FD takes the backing file's descriptor, valid here.
        let r = unsafe { libc::ioctl(lo.as_raw_fd(), LOOP_SET_FD, file.as_raw_fd()) };
        if r == 0 {
            return Ok(dev);
        }
    }
    Err(Error::NoLoopDevice)
}

fn detach_loop(dev: &str) -> Result<(), Error> {
    use std::os::fd::AsRawFd;
    let lo = std::fs::File::open(dev).map_err(Error::file(dev))?;
    // SAFETY: LOOP_CLR_FD takes no argument.
    let r = unsafe { libc::ioctl(lo.as_raw_fd(), LOOP_CLR_FD, 0) };
    if r == 0 {
        Ok(())
    } else {
        Err(Error::Kernel {
            call: format!("LOOP_CLR_FD {dev}"),
            source: std::io::Error::last_os_error(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The whole life of a real host, on this machine (root only: it says why it
    /// skips otherwise): made, broken (fdatasync fails), repaired, remounted, and
    /// gone without a trace when dropped.
    #[test]
    fn a_real_host_breaks_mends_and_leaves_nothing() {
        if let Err(why) = preflight() {
            eprintln!("skipped: the real host {why}");
            return;
        }
        let dir = tempfile::tempdir().expect("dir");
        let host = RealHost::set_up(dir.path(), 64 << 20, "test").expect("set up");
        let name = host.dm_name.clone().expect("dm name");
        let loop_dev = host.loop_dev.clone().expect("loop");
        let file = host.mount_point().join("f");
        std::fs::write(&file, b"before").expect("write");
        host.break_device().expect("break");
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&file)
            .expect("open");
        use std::io::Write;
        (&f).write_all(&[7u8; 8192])
            .expect("a write lands in the page cache");
        assert!(
            f.sync_data().is_err(),
            "fdatasync must fail while the device fails"
        );
        drop(f);
        host.repair_device().expect("repair");
        host.remount().expect("remount");
        assert!(!host.fs_down(), "mounted again, it takes writes");
        drop(host);
        let dm = run("dmsetup", &["ls"]).unwrap_or_default();
        assert!(!dm.contains(&name), "dm device {name} left: {dm}");
        let mounts = std::fs::read_to_string("/proc/mounts").expect("mounts");
        assert!(
            !mounts.contains(&dir.path().to_string_lossy().into_owned()),
            "{mounts}"
        );
        let backing = std::fs::read_to_string(format!(
            "/sys/block/{}/loop/backing_file",
            loop_dev.trim_start_matches("/dev/")
        ));
        assert!(backing.is_err(), "{loop_dev} still attached: {backing:?}");
    }
}
