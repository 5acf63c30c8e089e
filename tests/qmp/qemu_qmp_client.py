"""holdfast's QMP server driven by QEMU's own Python client library (qemu.qmp from
PyPI): its async QMPClient, its legacy QEMUMonitorProtocol, and qmp-shell.

Usage: python3 qemu_qmp_client.py HOLDFAST
The guest is a ten-byte ELF that counts in memory, which any KVM runs (this project's
machines emulate its kernel-mode loop). Prints one line per check and a closing
'N passed, N failed'.
"""

import asyncio
import os
import struct
import subprocess
import sys
import tempfile
import time

from qemu.qmp import QMPClient
from qemu.qmp.legacy import QEMUMonitorProtocol

def tiny_guest(path):
    """`loop: inc qword [0x2000000]; jmp loop`, as a static ELF loaded at 16 MiB."""
    entry = 0x1000000
    code = bytes([0x48, 0xFF, 0x04, 0x25]) + struct.pack("<I", 0x2000000) + bytes([0xEB, 0xF6])
    header = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)
    header += struct.pack("<HHIQQQIHHHHHH", 2, 62, 1, entry, 64, 0, 0, 64, 56, 1, 64, 0, 0)
    program = struct.pack("<IIQQQQQQ", 1, 5, 120, entry, entry, len(code), len(code), 0x1000)
    with open(path, "wb") as f:
        f.write(header + program + code)


holdfast = sys.argv[1]
work = tempfile.mkdtemp(prefix="holdfast-qmp-")
kernel = os.path.join(work, "counting.elf")
tiny_guest(kernel)
results = []


def check(name, ok, detail=""):
    results.append(ok)
    print(f"{'ok  ' if ok else 'FAIL'} {name}{': ' + str(detail) if detail and not ok else ''}")


def start(sock, extra=()):
    if os.path.exists(sock):
        os.unlink(sock)
    disk = os.path.join(work, "disk.img")
    with open(disk, "wb") as f:
        f.truncate(1 << 20)
    # holdfast's stderr goes to SOCK.err, printed if it does not exit 0 (finish).
    err = open(sock + ".err", "wb")
    proc = subprocess.Popen(
        [holdfast, "run", "--kernel", kernel, "--mem", "128M", "--serial", "none",
         "--disk", f"path={disk},id=data", "--qmp", sock, *extra],
        stdout=subprocess.DEVNULL, stderr=err)
    proc.err_path = sock + ".err"
    for _ in range(200):
        if os.path.exists(sock):
            return proc
        time.sleep(0.05)
    proc.kill()
    raise SystemExit("the QMP socket never appeared")


def finish(proc):
    """holdfast's exit status, or None (after killing it) if it does not exit; its
    stderr is printed unless it exited 0."""
    try:
        status = proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        status = None
    if status != 0:
        with open(proc.err_path, "rb") as f:
            print(f"     holdfast exited {status}; its stderr:")
            for line in f.read().decode(errors="replace").splitlines()[-20:]:
                print(f"     | {line}")
    return status


async def async_client(sock):
    proc = start(sock)
    qmp = QMPClient("holdfast-test")
    try:
        await qmp.connect(sock)
        check("QMPClient negotiates", qmp.greeting is not None)
        status = await qmp.execute("query-status")
        check("query-status says running", status.get("status") == "running", status)
        block = await qmp.execute("query-block")
        check("query-block lists the disk", block[0]["device"] == "data", block)
        with qmp.listener() as listener:
            await qmp.execute("stop")
            event = await asyncio.wait_for(listener.get(), 10)
            check("stop sends STOP", event["event"] == "STOP", event)
            status = await qmp.execute("query-status")
            check("query-status says paused", status["status"] == "paused", status)
            await qmp.execute("cont")
            event = await asyncio.wait_for(listener.get(), 10)
            check("cont sends RESUME", event["event"] == "RESUME", event)
        try:
            await qmp.execute("no-such-command")
            check("unknown commands fail", False)
        except Exception as e:  # qemu.qmp raises ExecuteError
            check("unknown commands fail with CommandNotFound", "CommandNotFound" in repr(e) or "not been found" in str(e), e)
        unflushed = await qmp.execute("x-query-unflushed")
        check("x-query-unflushed answers", unflushed[0]["device"] == "data", unflushed)
        with qmp.listener() as listener:
            await qmp.execute("quit")
            event = await asyncio.wait_for(listener.get(), 10)
            check("quit sends SHUTDOWN", event["event"] == "SHUTDOWN", event)
        await qmp.disconnect()
    finally:
        check("holdfast exits 0 after quit", finish(proc) == 0)


def legacy_client(sock):
    proc = start(sock)
    try:
        qmp = QEMUMonitorProtocol(sock)
        greeting = qmp.connect(negotiate=True)
        check("QEMUMonitorProtocol negotiates", "QMP" in greeting, greeting)
        raw = qmp.cmd_raw("query-status")
        check("legacy query-status", raw["return"]["status"] == "running", raw)
        qmp.cmd("stop")
        event = qmp.pull_event(wait=10)
        check("legacy client gets STOP", event and event["event"] == "STOP", event)
        qmp.cmd("cont")
        event = qmp.pull_event(wait=10)
        check("legacy client gets RESUME", event and event["event"] == "RESUME", event)
        r = qmp.cmd("query-commands")
        check("query-commands lists cont", any(c["name"] == "cont" for c in r), r)
        qmp.cmd("quit")
        qmp.close()
    finally:
        check("holdfast exits 0 after legacy quit", finish(proc) == 0)


def shell(sock):
    proc = start(sock)
    try:
        out = subprocess.run(["qmp-shell", sock], input="query-status\nquit\n", capture_output=True, text=True, timeout=30)
        check("qmp-shell runs query-status", '"status": "running"' in out.stdout, out.stdout + out.stderr)
    finally:
        check("holdfast exits 0 after qmp-shell quit", finish(proc) == 0)


def shell_detach_attach(sock):
    """The README's recovery session, typed into qmp-shell (key=value arguments)."""
    proc = start(sock)
    try:
        session = ("stop\nx-block-detach device=data\nquery-block\ncont\n"
                   "x-block-attach device=data filename=/nonexistent.img\n"
                   "x-block-attach device=data\ncont\nquery-status\nquit\n")
        out = subprocess.run(["qmp-shell", sock], input=session, capture_output=True, text=True, timeout=30)
        text = out.stdout
        print("     qmp-shell session:\n" + "\n".join("       " + l for l in text.splitlines()[-9:]))
        check("qmp-shell: x-block-detach", text.count('{"return": {}}') >= 4, text)
        check("qmp-shell: query-block shows the disk detached", '"x-detached": true' in text, text)
        check("qmp-shell: cont refused while detached, naming the disk", "disk data is detached" in text, text)
        check("qmp-shell: x-block-attach refuses a missing file", "/nonexistent.img does not exist" in text, text)
        check("qmp-shell: cont after x-block-attach runs the guest", '"status": "running"' in text, text)
    finally:
        check("holdfast exits 0 after qmp-shell quit (detach session)", finish(proc) == 0)


async def machine_queries(sock):
    """query-name, query-cpus-fast, query-blockstats and system_reset, as QEMU answers
    them, through QMPClient."""
    proc = start(sock, ["--name", "holdfast-test-vm", "--cpus", "2"])
    qmp = QMPClient("holdfast-test")
    try:
        await qmp.connect(sock)
        name = await qmp.execute("query-name")
        check("query-name answers --name", name == {"name": "holdfast-test-vm"}, name)
        cpus = await qmp.execute("query-cpus-fast")
        check("query-cpus-fast lists both vCPUs", [c["cpu-index"] for c in cpus] == [0, 1], cpus)
        threads = [c["thread-id"] for c in cpus]
        check("query-cpus-fast's thread-ids are holdfast's threads",
              all(os.path.exists(f"/proc/{proc.pid}/task/{t}") for t in threads), threads)
        check("query-cpus-fast says x86_64", all(c["target"] == "x86_64" for c in cpus), cpus)
        stats = await qmp.execute("query-blockstats")
        check("query-blockstats has the disk's counters",
              stats[0]["device"] == "data" and stats[0]["stats"]["wr_operations"] == 0
              and all(k in stats[0]["stats"] for k in ("failed_flush_operations", "invalid_rd_operations",
                                                        "rd_total_time_ns", "x-unflushed-bytes", "x-replays")), stats)
        with qmp.listener() as listener:
            answer = await qmp.execute("system_powerdown")
            event = await asyncio.wait_for(listener.get(), 10)
            check("system_powerdown presses the power button (POWERDOWN)",
                  answer == {} and event["event"] == "POWERDOWN", event)
        with qmp.listener() as listener:
            await qmp.execute("system_reset")
            event = await asyncio.wait_for(listener.get(), 10)
            check("system_reset ends the run (as -no-reboot) with SHUTDOWN",
                  event["event"] == "SHUTDOWN" and event["data"]["reason"] == "host-qmp-system-reset", event)
        await qmp.disconnect()
    finally:
        check("holdfast exits 0 after system_reset", finish(proc) == 0)


asyncio.run(async_client(os.path.join(work, "async.sock")))
asyncio.run(machine_queries(os.path.join(work, "machine.sock")))
legacy_client(os.path.join(work, "legacy.sock"))
shell(os.path.join(work, "shell.sock"))
shell_detach_attach(os.path.join(work, "detach.sock"))
passed = sum(results)
print(f"{passed} passed, {len(results) - passed} failed")
sys.exit(0 if all(results) else 1)
