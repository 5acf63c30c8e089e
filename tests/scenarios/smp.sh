# Boots the default guest with 2 vCPUs and two disks, the second read-only: the guest
# must see both CPUs (nproc), both disks, and the second one read-only.
set -u -o pipefail
fail() { echo "SCENARIO FAIL smp: $*"; exit 1; }
cp "$GUEST/disk.img" "$WORK/a.img" && cp "$GUEST/disk.img" "$WORK/b.img" || fail "cannot copy the disk images"
"$HOLDFAST" run --kernel "$GUEST/vmlinuz" --initrd "$GUEST/initramfs.cpio.gz" --mem 256M --cpus 2 --serial stdio \
    --disk "path=$WORK/a.img,id=a" --disk "path=$WORK/b.img,id=b,readonly=on" \
    --cmdline "console=ttyS0 panic=-1 quiet holdfast.workload=none" | tee "$WORK/console.log"
status=$?
[ "$status" -eq 0 ] || fail "holdfast exited with $status"
grep -q "GUEST NPROC 2" "$WORK/console.log" || fail "the guest does not see 2 CPUs"
grep -q "GUEST DISKS 2" "$WORK/console.log" || fail "the guest does not see 2 disks"
grep -q "GUEST VDB RO 1" "$WORK/console.log" || fail "the read-only disk is not read-only in the guest"
# The ring features Linux takes when offered: indirect tables (bit 28) and event
# indexes (bit 29); the guest prints the bits from 0.
features=$(tr -d '\r' < "$WORK/console.log" | sed -n 's/^GUEST VDA FEATURES //p' | head -n 1)
ring=$(printf '%s' "$features" | cut -c29-30)
[ "${#ring}" -eq 2 ] || fail "the guest did not print vda's features ('$features')"
[ "$ring" = 11 ] || fail "the guest's driver did not take VIRTIO_RING_F_INDIRECT_DESC and VIRTIO_RING_F_EVENT_IDX: $features"
echo "SCENARIO OK smp: the guest sees 2 CPUs and 2 disks, the second read-only; its driver took indirect tables and event indexes"
