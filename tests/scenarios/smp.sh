# Boots the default guest with 2 vCPUs; the guest must see both (nproc).
set -u -o pipefail
fail() { echo "SCENARIO FAIL smp: $*"; exit 1; }
"$HOLDFAST" run --kernel "$GUEST/vmlinuz" --initrd "$GUEST/initramfs.cpio.gz" --mem 256M --cpus 2 \
    --serial stdio --cmdline "console=ttyS0 panic=-1 holdfast.workload=none" | tee "$WORK/console.log"
status=$?
[ "$status" -eq 0 ] || fail "holdfast exited with $status"
grep -q "GUEST NPROC 2" "$WORK/console.log" || fail "the guest does not see 2 CPUs"
echo "SCENARIO OK smp: the guest sees 2 CPUs"
