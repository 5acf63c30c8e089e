# Boot time to the guest's init: holdfast vs QEMU -M microvm, the same kernel and
# initramfs, in the same test host, alternating, 3 runs each; medians and their ratio.
set -u
fail() { echo "SCENARIO FAIL bench-boot: $*"; exit 1; }
CMDLINE="console=ttyS0 panic=-1 holdfast.workload=none"
boot_ms() { "$WORKLOAD" time-to "GUEST INIT" -- "$@" > "$WORK/boot.log" 2>&1; sed -n 's/^TIME-TO //p' "$WORK/boot.log"; }
median() { printf '%s\n' "$@" | sort -n | sed -n 2p; }
h=""; q=""
for i in 1 2 3; do
    t=$(boot_ms "$HOLDFAST" run --kernel "$GUEST/vmlinuz" --initrd "$GUEST/initramfs.cpio.gz" --mem 256M --cmdline "$CMDLINE")
    [ -n "$t" ] || { cat "$WORK/boot.log"; fail "holdfast did not reach the guest's init"; }
    h="$h $t"
    t=$(boot_ms "$QEMU" -M microvm,acpi=on -enable-kvm -cpu host -m 256 -nographic -no-reboot -L "$QEMU_DATA" \
        -kernel "$GUEST/vmlinuz" -initrd "$GUEST/initramfs.cpio.gz" -append "$CMDLINE")
    [ -n "$t" ] || { cat "$WORK/boot.log"; fail "QEMU did not reach the guest's init"; }
    q="$q $t"
    echo "run $i: holdfast $(echo $h | awk '{print $NF}') ms, qemu $(echo $q | awk '{print $NF}') ms"
done
hm=$(median $h); qm=$(median $q)
ratio=$(awk -v a="$hm" -v b="$qm" 'BEGIN { printf "%.2f", a / b }')
verdict=$(awk -v r="$ratio" 'BEGIN { print (r <= 1.0) ? "meets target" : "ABOVE TARGET" }')
echo "BENCH boot to guest init (median of 3, emulated nested host): holdfast $hm ms, QEMU microvm $qm ms, ratio $ratio (target <= 1.0, $verdict)"
echo "SCENARIO OK bench-boot"
