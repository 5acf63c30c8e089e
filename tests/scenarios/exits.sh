# How a guest's end ends holdfast: a reboot exits 0 (holdfast does not reset the
# guest), a panic reported through pvpanic exits 3.
set -u -o pipefail
fail() { echo "SCENARIO FAIL exits: $*"; exit 1; }
boot() {
    "$HOLDFAST" run --kernel "$GUEST/vmlinuz" --initrd "$GUEST/initramfs.cpio.gz" --mem 256M --serial stdio \
        --cmdline "console=ttyS0 panic=-1 holdfast.workload=$1" | tee "$WORK/$1.log"
}
boot reboot
status=$?
grep -q "GUEST REBOOT" "$WORK/reboot.log" || fail "the guest did not get to its reboot"
[ "$status" -eq 0 ] || fail "a guest reboot ended holdfast with $status, not 0"
boot panic
status=$?
grep -q "GUEST PANIC" "$WORK/panic.log" || fail "the guest did not get to its panic"
[ "$status" -eq 3 ] || fail "a guest panic ended holdfast with $status, not 3"
echo "SCENARIO OK exits: reboot ended holdfast with 0, panic (pvpanic) with 3"
