# A real host storage outage under a running guest. The guest's image lives on ext4
# over a device-mapper linear target (on a RAM disk); the guest writes numbered,
# checksummed records with fdatasync and prints ACK n for each. Mid-run the dm table
# is swapped for an error table: holdfast must stop (io-error), refuse `cont` while
# storage is broken, and after the outage ends resume on `cont` and finish; every
# ACKed record must then be intact in the image after dropping the host page cache
# and remounting the host file system. The outage also strikes again during the
# first replay after it ended (a one-shot flush failure armed over QMP).
set -u
N=300
SOCK="$WORK/qmp.sock"
export DM_DISABLE_UDEV=1
fail() { echo "SCENARIO FAIL outage: $*"; [ -n "${pid:-}" ] && kill "$pid" 2>/dev/null; exit 1; }
q() { "$WORKLOAD" qmp "$SOCK" "$@"; }
state() { q query-status 2>/dev/null | sed -n 's/.*"status": *"\([a-z-]*\)".*/\1/p'; }
acks() { n=$(grep -c "^ACK " "$WORK/console.log" 2>/dev/null); echo "${n:-0}"; }
table() { dmsetup suspend --nolockfs hfhost && dmsetup load hfhost --table "0 $SECTORS $1" && dmsetup resume hfhost; }

insmod /lib/modules/brd.ko rd_nr=1 rd_size=262144 2>/dev/null || modprobe brd rd_nr=1 rd_size=262144 || fail "no brd"
SECTORS=$(cat /sys/block/ram0/size)
dmsetup create hfhost --table "0 $SECTORS linear /dev/ram0 0" || fail "dmsetup create"
/usr/sbin/mke2fs -q -t ext4 -F -E lazy_itable_init=0,lazy_journal_init=0 /dev/mapper/hfhost || fail "mke2fs"
mkdir -p "$WORK/host" "$WORK/mnt"
mount -o lazytime /dev/mapper/hfhost "$WORK/host" || fail "cannot mount the host file system"
cp "$GUEST/disk.img" "$WORK/host/disk.img" && sync || fail "cannot copy the image"

"$HOLDFAST" run --kernel "$GUEST/vmlinuz" --initrd "$GUEST/initramfs.cpio.gz" --mem 256M \
    --disk "path=$WORK/host/disk.img,id=data" --qmp "$SOCK" --serial "file:$WORK/console.log" \
    --cmdline "console=ttyS0 panic=-1 holdfast.workload=records holdfast.records=$N" &
pid=$!
i=0
while [ "$(acks)" -lt 30 ]; do sleep 0.2; i=$((i + 1)); [ $i -lt 900 ] || fail "the guest never acknowledged 30 records"; done
table error || fail "cannot start the outage"
echo "OUTAGE started after $(acks) acknowledged records"
i=0
until [ "$(state)" = io-error ]; do sleep 0.5; i=$((i + 1)); [ $i -lt 120 ] || fail "holdfast did not stop on the outage"; done
echo "OUTAGE holdfast stopped (io-error) after $(acks) acknowledged records"
q x-query-unflushed
sleep 3
if q cont; then fail "cont succeeded while storage was broken"; fi
[ "$(state)" = io-error ] || fail "not paused after a failed cont"
table "linear /dev/ram0 0" || fail "cannot end the outage"
echo "OUTAGE ended"
# The outage strikes again during the replay: its flush fails once.
q x-block-fault '{"device": "data", "arm": {"name": "again", "op": "flush", "errno": "EIO", "when": "once"}}' \
    || fail "cannot arm the fault"
if q cont; then fail "cont succeeded although its replay's flush failed"; fi
[ "$(state)" = io-error ] || fail "not paused after a replay that failed"
echo "OUTAGE struck again during the replay: cont refused, still paused"
q cont || fail "cont failed after the outage ended for good"
wait "$pid"
status=$?
pid=
cat "$WORK/console.log"
[ "$status" -eq 0 ] || fail "holdfast exited with $status"
grep -q "GUEST WORKLOAD OK" "$WORK/console.log" || fail "the guest's workload did not finish"
acked=$(acks)
sync
umount "$WORK/host" || fail "cannot unmount the host file system"
echo 3 > /proc/sys/vm/drop_caches
mount /dev/mapper/hfhost "$WORK/host" || fail "cannot remount the host file system"
mount -o loop,ro "$WORK/host/disk.img" "$WORK/mnt" || fail "cannot mount the image"
"$WORKLOAD" verify "$WORK/mnt/records.dat" "$acked"
verified=$?
umount "$WORK/mnt"; umount "$WORK/host"; dmsetup remove hfhost
[ "$verified" -eq 0 ] || fail "acknowledged records are missing or damaged after the outage"
echo "SCENARIO OK outage: stopped on the outage, refused cont while broken and when it struck again during the replay, resumed; $acked acknowledged records intact after remount"
