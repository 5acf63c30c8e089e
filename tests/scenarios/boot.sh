# Boots the default guest to its init; a guest poweroff must end holdfast with 0.
set -u -o pipefail
fail() { echo "SCENARIO FAIL boot: $*"; exit 1; }
"$HOLDFAST" run --kernel "$GUEST/vmlinuz" --initrd "$GUEST/initramfs.cpio.gz" --mem 256M \
    --serial stdio --cmdline "console=ttyS0 panic=-1 quiet holdfast.workload=none" | tee "$WORK/console.log"
status=$?
[ "$status" -eq 0 ] || fail "holdfast exited with $status after the guest powered off"
grep -q "GUEST INIT" "$WORK/console.log" || fail "the guest did not reach its init"
echo "SCENARIO OK boot: the guest reached its init and its poweroff ended holdfast with 0"
