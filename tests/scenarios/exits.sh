# How a guest's end ends holdfast: a reboot exits 0 (holdfast does not reset the
# guest), a panic reported through pvpanic exits 3; a command's status reaches holdfast
# through the debug-exit port (holdfast.run="..."), also with a device-mapper device
# as the disk under a fault plan, and a panic from that command (no pvpanic driver
# loaded: its console says it) exits 3 with the console's last lines.
set -u -o pipefail
fail() { echo "SCENARIO FAIL exits: $*"; exit 1; }
boot() {
    "$HOLDFAST" run --kernel "$GUEST/vmlinuz" --initrd "$GUEST/initramfs.cpio.gz" --mem 256M --serial stdio \
        --cmdline "console=ttyS0 panic=-1 quiet holdfast.workload=$1" | tee "$WORK/$1.log"
}
boot reboot
status=$?
grep -q "GUEST REBOOT" "$WORK/reboot.log" || fail "the guest did not get to its reboot"
[ "$status" -eq 0 ] || fail "a guest reboot ended holdfast with $status, not 0"
boot panic
status=$?
grep -q "GUEST PANIC" "$WORK/panic.log" || fail "the guest did not get to its panic"
[ "$status" -eq 3 ] || fail "a guest panic ended holdfast with $status, not 3"

# holdfast.run: COMMAND's status is holdfast's.
verdict() { # NAME 'COMMAND' [holdfast run options...]
    local name=$1 command=$2
    shift 2
    "$HOLDFAST" run --kernel "$GUEST/vmlinuz" --initrd "$GUEST/initramfs.cpio.gz" --mem 256M --serial stdio \
        --boot-timeout 300 "$@" --cmdline "console=ttyS0 panic=-1 quiet holdfast.run=\"$command\"" \
        > "$WORK/$name.log" 2> "$WORK/$name.err"
}
# As the README's quickstart: the run in the background, holdfast qmp beside it.
verdict seven 'echo guest says 7; exit 7' --qmp "$WORK/qmp.sock" &
pid=$!
i=0
while [ ! -S "$WORK/qmp.sock" ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
"$HOLDFAST" qmp "$WORK/qmp.sock" query-status > "$WORK/qmp.out" || fail "holdfast qmp query-status failed"
grep -q '"status": "running"' "$WORK/qmp.out" || fail "holdfast qmp query-status: $(cat "$WORK/qmp.out")"
wait "$pid"
status=$?
cat "$WORK/seven.log"
grep -q "GUEST RUN STATUS 7" "$WORK/seven.log" || fail "the guest did not run its command"
[ "$status" -eq 7 ] || fail "a command exiting 7 ended holdfast with $status, not 7"

# The disk a device-mapper device (linear over a loop device), a seeded fault plan
# slowing half its writes; the command writes a file, syncs and exits 7; the file is
# on the device after holdfast ended, read past the page cache.
# (no udev in the test host: dmsetup makes the /dev/mapper node itself)
export DM_DISABLE_UDEV=1
cp "$GUEST/disk.img" "$WORK/dm.img" || fail "cannot copy the disk image"
loop=$(losetup -f) && losetup "$loop" "$WORK/dm.img" || fail "losetup"
dm=hf-exits-$$
dmsetup create "$dm" --table "0 $(blockdev --getsz "$loop") linear $loop 0" || fail "dmsetup create"
cleanup() { dmsetup remove "$dm" 2> /dev/null; losetup -d "$loop" 2> /dev/null; }
trap cleanup EXIT
printf '%s\n' '{"seed": 7, "rules": [{"op": "write", "delay_ms": 20, "probability": 0.5}]}' > "$WORK/plan.json"
"$HOLDFAST" faults "$WORK/plan.json" || fail "holdfast faults refused the plan"
verdict dm 'mount /dev/vda /mnt && echo written-under-faults > /mnt/verdict && umount /mnt && exit 7' \
    --disk "path=/dev/mapper/$dm,id=data,format=raw,faults=$WORK/plan.json"
status=$?
cat "$WORK/dm.log"
[ "$status" -eq 7 ] || { cat "$WORK/dm.err"; fail "the dm-device run ended holdfast with $status, not 7"; }
echo 3 > /proc/sys/vm/drop_caches
mkdir -p "$WORK/mnt"
mount -o ro "/dev/mapper/$dm" "$WORK/mnt" || fail "cannot mount the dm device after the run"
got=$(cat "$WORK/mnt/verdict" 2> /dev/null)
umount "$WORK/mnt"
[ "$got" = written-under-faults ] || fail "the file the guest wrote is not on the dm device ('$got')"

# system_powerdown: the guest's ACPI power button (the GED's event); the default
# guest's init powers off cleanly on it, whatever runs (here a long sleep): exit 0.
"$HOLDFAST" run --kernel "$GUEST/vmlinuz" --initrd "$GUEST/initramfs.cpio.gz" --mem 256M --serial stdio \
    --qmp "$WORK/power.sock" --cmdline 'console=ttyS0 panic=-1 quiet holdfast.run="sleep 600; exit 9"' \
    > "$WORK/power.log" 2> "$WORK/power.err" &
pid=$!
i=0
until grep -q "POWER BUTTON WAITING" "$WORK/power.log"; do
    sleep 0.5; i=$((i + 1))
    [ $i -lt 240 ] || { kill "$pid"; cat "$WORK/power.log"; fail "the guest's power-button watcher did not start"; }
done
"$HOLDFAST" qmp "$WORK/power.sock" system_powerdown > /dev/null || fail "holdfast qmp system_powerdown failed"
i=0
while kill -0 "$pid" 2> /dev/null; do
    sleep 0.5; i=$((i + 1))
    [ $i -lt 120 ] || { kill "$pid"; cat "$WORK/power.log"; fail "the guest did not power off on system_powerdown within 60 s"; }
done
wait "$pid"
status=$?
grep -q "GUEST POWER BUTTON" "$WORK/power.log" || { cat "$WORK/power.log"; fail "the guest did not see its power button"; }
[ "$status" -eq 0 ] || { cat "$WORK/power.err"; fail "a power-off on system_powerdown ended holdfast with $status, not 0"; }

# A command that panics the kernel (sysrq c): holdfast exits 3 and prints the
# console's last lines.
verdict crash 'echo c > /proc/sysrq-trigger'
status=$?
[ "$status" -eq 3 ] || { cat "$WORK/crash.log" "$WORK/crash.err"; fail "a panicking command ended holdfast with $status, not 3"; }
grep -q "the console's last lines" "$WORK/crash.err" || fail "holdfast did not print the console's last lines on the panic"
echo "SCENARIO OK exits: reboot ended holdfast with 0, panic (pvpanic) with 3; holdfast.run's 'exit 7' with 7 (holdfast qmp query-status beside it), also on a dm device under a seeded fault plan (its file on the device after the run); a panicking command with 3 and the console's last lines; system_powerdown powered the guest off (0)"
