# Boots the default guest with its ext4 disk; the guest writes numbered, checksummed
# records with fdatasync (printing ACK n for each), reads them back and powers off.
# Then, on the host: drop the page cache, mount the image, verify every ACKed record.
# Runs under busybox sh (in the nested test host) and bash (directly on a host).
# Needs: HOLDFAST (the binary), GUEST (kernel, initramfs, disk image), WORKLOAD
# (the verifier), WORK (a scratch directory). Prints SCENARIO OK or SCENARIO FAIL.
set -u -o pipefail
fail() { echo "SCENARIO FAIL records: $*"; exit 1; }
N=${RECORDS:-200}
cp "$GUEST/disk.img" "$WORK/disk.img" || fail "cannot copy the disk image"
"$HOLDFAST" run --kernel "$GUEST/vmlinuz" --initrd "$GUEST/initramfs.cpio.gz" --mem 256M \
    --disk "path=$WORK/disk.img,id=data" --serial stdio \
    --cmdline "console=ttyS0 panic=-1 quiet holdfast.workload=records holdfast.records=$N" | tee "$WORK/console.log"
status=$?
[ "$status" -eq 0 ] || fail "holdfast exited with $status"
grep -q "GUEST WORKLOAD OK" "$WORK/console.log" || fail "the guest's workload did not finish"
acked=$(grep -c "^ACK " "$WORK/console.log")
[ "$acked" -eq "$N" ] || fail "$acked of $N records acknowledged"
echo "dropping the host's page cache (echo 3 > /proc/sys/vm/drop_caches)"
sync
echo 3 > /proc/sys/vm/drop_caches
mkdir -p "$WORK/mnt"
mount -o loop,ro "$WORK/disk.img" "$WORK/mnt" || fail "cannot mount the image"
"$WORKLOAD" verify "$WORK/mnt/records.dat" "$acked"
verified=$?
umount "$WORK/mnt"
[ "$verified" -eq 0 ] || fail "acknowledged records are missing or damaged on the host"
echo "SCENARIO OK records: $acked acknowledged records intact in the image after dropping the page cache"
