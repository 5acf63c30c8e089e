# An ENOSPC outage: the guest's image is a sparse file on a small ext4 host file
# system (no root reserve) that is nearly full, and fills up mid-run; the guest's next writes into the image's holes fail
# with ENOSPC. holdfast must stop with io-status nospace (BLOCK_IO_ERROR nospace),
# keep refusing `cont` while the file system is full (a user `stop` in the middle
# changes nothing), resume once space is freed, and lose no acknowledged record.
set -u
NAME=outage-enospc
RAMDISK_MB=256
GATE_AT= # no dm outage here: the file system fills up by itself
. "$(dirname "$0")/outage.lib"
host_setup
sparse_image
# Fill the host file system up to 512 KiB before the guest starts (filling it while
# the guest runs races with the guest's end): about a hundred records fit.
free=$(df -Pk "$WORK/host" | awk 'NR == 2 { print $4 }')
case "$free" in '' | *[!0-9]*) fail "cannot read the host file system's free space (df said: $(df -Pk "$WORK/host" | tr '\n' ' '))" ;; esac
dd if=/dev/zero of="$WORK/host/filler" bs=64k count=$(((free - 512) / 64)) 2>/dev/null
sync
echo "HOST nearly full: $(df -Pk "$WORK/host" | awk 'NR == 2 { print $4 }') KiB free"
start_holdfast
wait_for 100 "holdfast did not stop when the host file system filled up" in_state io-error
[ "$(acks)" -ge 1 ] || fail "the host file system filled up before the guest acknowledged a record"
echo "ENOSPC holdfast stopped (io-error) after $(acks) acknowledged records"
q query-block | grep -q '"io-status": *"nospace"' || { q query-block; fail "io-status is not nospace"; }
q x-query-unflushed
q stop || fail "stop failed"
in_state io-error || fail "a user stop changed the run state of a VM stopped on an error"
sleep 2
if q cont > "$WORK/cont.out" 2>&1; then cat "$WORK/cont.out"; fail "cont succeeded while the host file system was full"; fi
cat "$WORK/cont.out"
grep -q "ENOSPC" "$WORK/cont.out" || fail "the refused cont does not name ENOSPC"
in_state io-error || fail "not paused after a failed cont"
rm -f "$WORK/host/filler"
sync
echo "ENOSPC space freed: $(df -Pk "$WORK/host" | awk 'NR == 2 { print $4 }') KiB free"
q cont || fail "cont failed after space was freed"
holdfast_outage_finish
host_teardown
echo "SCENARIO OK $NAME: stopped with io-status nospace when the host file system filled up, refused cont while full (and after a user stop), resumed after space was freed; $acked acknowledged records intact after remount"
