"""The client side of the outage-client scenario: QEMU's own Python QMP library
(qemu.qmp from PyPI) drives holdfast through two real host storage outages in one
guest, the first with its async QMPClient, the second with its legacy
QEMUMonitorProtocol. In the nested test host it reaches holdfast's socket over a
virtio-serial port (QEMU chardev socket outside, `workload relay` inside); on the
direct path it connects to the socket itself.

Usage: python3 outage-client.client.py QMP CTL_TO_SCENARIO CTL_FROM_SCENARIO
The control channel (a socket for both directions, or two FIFOs) carries one word a
line: hello, started, connected, outage, end-outage, ended, async-done, then
started, connected, outage, end-outage, ended, done for the second outage (or
`fail WHY`). After `ended`, a cont that fails with the host file system's error makes
the client say `recheck`, as an operator would look again: the host file system can
go down a moment after the scenario found it working (ext4 aborts its journal when a
commit that met the outage completes); the scenario answers `repaired` (it was
down: detached, repaired, attached) or `not-down` (then the failed cont is a defect).
Prints one line per check and exits 1 on the first failure.
"""

import asyncio
import os
import socket
import stat
import sys
import time

from qemu.qmp import ExecuteError, QMPClient
from qemu.qmp.legacy import QEMUMonitorProtocol

qmp_path, ctl_out_path, ctl_in_path = sys.argv[1:4]


def wait_path(path, seconds=120):
    deadline = time.time() + seconds
    while not os.path.exists(path):
        if time.time() > deadline:
            raise SystemExit(f"CLIENT FAIL {path} never appeared")
        time.sleep(0.1)


class Ctl:
    """The control channel to the scenario script."""

    def __init__(self):
        wait_path(ctl_out_path)
        if stat.S_ISSOCK(os.stat(ctl_out_path).st_mode):
            s = socket.socket(socket.AF_UNIX)
            s.connect(ctl_out_path)
            self.w = s.makefile("w")
            self.r = s.makefile("r")
        else:  # FIFOs: open in the order the scenario does
            self.w = open(ctl_out_path, "w")
            self.r = open(ctl_in_path, "r")

    def say(self, word):
        self.w.write(word + "\n")
        self.w.flush()

    def hear(self):
        line = self.r.readline()
        if not line:
            raise SystemExit("CLIENT FAIL the scenario closed the control channel")
        return line.strip()


ctl = None


def check(name, ok, detail=""):
    print(f"{'ok  ' if ok else 'FAIL'} {name}{': ' + str(detail) if detail and not ok else ''}", flush=True)
    if not ok:
        if ctl:
            ctl.say(f"fail {name}")
        raise SystemExit(f"CLIENT FAIL {name}")


async def expect(ctl, word):
    got = await asyncio.to_thread(ctl.hear)
    check(f"the scenario says {word}", got == word, got)


def recheck(desc):
    """The operator's second look after a cont failed once the outage ended."""
    print(f"     cont after the outage ended failed: {desc}", flush=True)
    check("the failed cont names the host's error and says what to do",
          ("EIO" in desc or "EROFS" in desc) and "x-block-detach" in desc, desc)
    ctl.say("recheck")
    word = ctl.hear()
    check("the host file system had gone down after the outage ended (repaired, attached)",
          word == "repaired", word)


async def next_event(listener, name, seconds):
    """The next event named `name` (others are printed and skipped)."""
    deadline = time.time() + seconds
    while True:
        left = deadline - time.time()
        if left <= 0:
            check(f"{name} arrives within {seconds} s", False, "timed out")
        try:
            event = await asyncio.wait_for(listener.get(), left)
        except asyncio.TimeoutError:
            check(f"{name} arrives within {seconds} s", False, "timed out")
        print(f"     event {event['event']} {event.get('data', {})}", flush=True)
        if event["event"] == name:
            return event


async def main():
    global ctl
    ctl = Ctl()
    ctl.say("hello")
    await expect(ctl, "started")
    wait_path(qmp_path)
    qmp = QMPClient("holdfast-outage")
    await asyncio.wait_for(qmp.connect(qmp_path), 60)
    check("QMPClient negotiates with holdfast", qmp.greeting is not None)
    with qmp.listener() as listener:
        status = await qmp.execute("query-status")
        check("query-status: running before the outage", status.get("status") == "running", status)
        ctl.say("connected")
        await expect(ctl, "outage")

        error = await next_event(listener, "BLOCK_IO_ERROR", 120)
        data = error.get("data", {})
        check("BLOCK_IO_ERROR names the disk and says stop",
              data.get("device") == "data" and data.get("action") == "stop" and data.get("nospace") is False,
              data)
        check("BLOCK_IO_ERROR gives the host's reason", data.get("reason") == "Input/output error", data)
        await next_event(listener, "STOP", 10)
        check("STOP follows BLOCK_IO_ERROR", True)
        status = await qmp.execute("query-status")
        check("query-status: io-error", status.get("status") == "io-error", status)
        block = await qmp.execute("query-block")
        check("query-block: io-status failed", block[0].get("io-status") == "failed", block)
        unflushed = await qmp.execute("x-query-unflushed")
        check("x-query-unflushed: bytes kept", unflushed[0].get("bytes", 0) > 0, unflushed)
        print(f"     holding {unflushed[0]['bytes']} unflushed bytes, {unflushed[0]['parked']} parked requests",
              flush=True)

        await asyncio.sleep(3)
        try:
            await qmp.execute("cont")
            check("cont is refused while storage is broken", False, "it succeeded")
        except ExecuteError as e:
            desc = str(e)
            check("cont is refused while storage is broken, naming disk and errno",
                  "data" in desc and ("EIO" in desc or "EROFS" in desc), desc)
        await next_event(listener, "BLOCK_IO_ERROR", 10)
        check("the refused cont sends BLOCK_IO_ERROR again", True)
        status = await qmp.execute("query-status")
        check("query-status: still io-error", status.get("status") == "io-error", status)

        ctl.say("end-outage")
        await expect(ctl, "ended")
        try:
            reply = await qmp.execute("cont")
        except ExecuteError as e:
            failed = await next_event(listener, "X_BLOCK_REPLAY", 10)
            check("X_BLOCK_REPLAY says the replay failed", failed["data"].get("outcome") == "failed", failed)
            await asyncio.to_thread(recheck, str(e))
            reply = await qmp.execute("cont")
        check("cont after the outage ended succeeds", reply == {}, reply)
        replay = await next_event(listener, "X_BLOCK_REPLAY", 10)
        check("X_BLOCK_REPLAY reports the replay",
              replay["data"].get("outcome") == "ok" and replay["data"].get("bytes-rewritten", 0) > 0,
              replay["data"])
        await next_event(listener, "RESUME", 10)
        check("RESUME follows the replay", True)
        status = await qmp.execute("query-status")
        check("query-status: running", status.get("status") == "running", status)
    await qmp.disconnect()
    ctl.say("async-done")


def legacy_next_event(qmp, name, seconds):
    """The next event named `name` through the legacy client (others are skipped)."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        event = qmp.pull_event(wait=max(0.1, deadline - time.time()))
        if event is None:
            break
        print(f"     legacy event {event['event']} {event.get('data', {})}", flush=True)
        if event["event"] == name:
            return event
    check(f"legacy: {name} arrives within {seconds} s", False, "timed out")


def legacy_phase():
    """A second outage in the same guest, driven by the legacy QEMUMonitorProtocol."""
    if ctl.hear() != "started":
        check("the scenario restarts the bridge", False)
    qmp = QEMUMonitorProtocol(qmp_path)
    greeting = qmp.connect(negotiate=True)
    check("QEMUMonitorProtocol negotiates with holdfast", greeting and "QMP" in greeting, greeting)
    raw = qmp.cmd_raw("query-status")
    check("legacy query-status: running", raw.get("return", {}).get("status") == "running", raw)
    ctl.say("connected")
    check("the scenario says outage (the second one)", ctl.hear() == "outage")
    error = legacy_next_event(qmp, "BLOCK_IO_ERROR", 120)
    check("legacy: BLOCK_IO_ERROR names the disk", error["data"].get("device") == "data", error)
    legacy_next_event(qmp, "STOP", 10)
    check("legacy: STOP follows BLOCK_IO_ERROR", True)
    raw = qmp.cmd_raw("query-status")
    check("legacy query-status: io-error", raw.get("return", {}).get("status") == "io-error", raw)
    raw = qmp.cmd_raw("cont")
    desc = raw.get("error", {}).get("desc", "")
    check("legacy: cont refused while broken, naming disk and errno", "data" in desc and ("EIO" in desc or "EROFS" in desc), raw)
    failed = legacy_next_event(qmp, "X_BLOCK_REPLAY", 10)
    check("legacy: X_BLOCK_REPLAY says the replay failed", failed["data"].get("outcome") == "failed", failed)
    legacy_next_event(qmp, "BLOCK_IO_ERROR", 10)
    check("legacy: the refused cont sends BLOCK_IO_ERROR again", True)
    ctl.say("end-outage")
    check("the scenario says ended (the second outage)", ctl.hear() == "ended")
    raw = qmp.cmd_raw("cont")
    if "error" in raw:
        failed = legacy_next_event(qmp, "X_BLOCK_REPLAY", 10)
        check("legacy: X_BLOCK_REPLAY says the replay failed", failed["data"].get("outcome") == "failed", failed)
        recheck(raw["error"].get("desc", ""))
        raw = qmp.cmd_raw("cont")
    check("legacy: cont after the outage succeeds", raw.get("return") == {}, raw)
    replay = legacy_next_event(qmp, "X_BLOCK_REPLAY", 10)
    check("legacy: X_BLOCK_REPLAY says ok", replay["data"].get("outcome") == "ok", replay)
    legacy_next_event(qmp, "RESUME", 10)
    check("legacy: RESUME follows the replay", True)
    qmp.close()
    ctl.say("done")


asyncio.run(main())
legacy_phase()
print("CLIENT OK", flush=True)
