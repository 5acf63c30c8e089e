# Hung host storage, as a hard NFS mount or a lost iSCSI path does it: the data
# disk's dm device is suspended with --noflush for 25 s while the guest writes
# fdatasync'd records to it (and, every half second, a block with fsync to a second
# disk on healthy storage). The guest's kernel reports tasks blocked for more than
# 10 s (sysctl.kernel.hung_task_timeout_secs=10 on its command line; 120 s by
# default).
#  1. holdfast without hang-timeout: the guest waits with the call; QMP answers
#     throughout (each command's round trip measured; `stop` too, while the call
#     hangs, and `cont` is refused naming it), query-block names the call, the
#     second disk goes on; after the resume the guest's I/O completes. Its
#     kernel reports hung tasks (checked: the next run's "none" means something).
#  2. holdfast with hang-timeout=3: the VM pauses (io-error, BLOCK_IO_ERROR naming
#     the call), `cont` is refused while the call hangs, succeeds after the resume;
#     the guest's kernel reports no hung task.
#  3. QEMU 10 (werror=stop) on the same hang: how long its `stop` takes to answer,
#     whether its guest reports hung tasks.
#  4. holdfast, `quit` during the hang: answered at once, says within seconds what
#     it cannot settle, exits 6 (bytes dropped) once the kernel lets the stuck call go.
# Every acknowledged record intact after each run (host page cache dropped). Root.
set -u
NAME=hang
RECORDS=${RECORDS:-150}
. "$(dirname "$0")/outage.lib"
HANG_S=25
SECOND="$WORK/second.img"
CMDLINE_HANG="console=ttyS0 panic=-1 quiet holdfast.workload=records-second holdfast.records=$RECORDS holdfast.gate=vdc:$GATE_AT sysctl.kernel.hung_task_timeout_secs=10"
export HOLDFAST_QMP_TIMING=1
ms() { "$WORKLOAD" qmp "$SOCK" "$@" 2>&1 >/dev/null | sed -n 's/^QMP-MS [^ ]* //p'; }
vdb() { n=$(grep -c "^VDB " "$CONSOLE" 2>/dev/null); echo "${n:-0}"; }
hung_tasks() { n=$(grep -c "blocked for more than" "$CONSOLE" 2>/dev/null); echo "${n:-0}"; }
suspend_host() { dmsetup suspend --noflush --nolockfs "$DM_HOST" || fail "cannot suspend the host device"; }
resume_host() { dmsetup resume "$DM_HOST" || fail "cannot resume the host device"; }

# The disks: data (vda), second (vdb), the gate (vdc; outage.lib).
start_holdfast_hang() { # extra --disk options for the data disk: $1
    rm -f "$CONSOLE"
    truncate -s 16M "$SECOND"
    new_gate
    "$HOLDFAST" run --kernel "$GUEST/vmlinuz" --initrd "$GUEST/initramfs.cpio.gz" --mem 256M \
        --disk "path=$IMG,id=data$1" --disk "path=$SECOND,id=second" --disk "path=$GATE,id=gate" --qmp "$SOCK" \
        --serial "file:$CONSOLE" --cmdline "$CMDLINE_HANG" 2> "$WORK/vmm.err" &
    pid=$!
}
start_qemu_hang() {
    rm -f "$CONSOLE"
    truncate -s 16M "$SECOND"
    new_gate
    set -- -M microvm,acpi=on -enable-kvm -cpu host -m 256 -display none -monitor none -no-reboot \
        -kernel "$GUEST/vmlinuz" -initrd "$GUEST/initramfs.cpio.gz" -append "$CMDLINE_HANG" \
        -drive "file=$IMG,if=none,id=data,format=raw,werror=stop,rerror=stop" -device virtio-blk-device,drive=data \
        -drive "file=$SECOND,if=none,id=second,format=raw" -device virtio-blk-device,drive=second \
        -drive "file=$GATE,if=none,id=gate,format=raw" -device virtio-blk-device,drive=gate \
        -serial "file:$CONSOLE" -qmp "unix:$SOCK,server=on,wait=off"
    if [ -n "${QEMU_DATA:-}" ]; then set -- -L "$QEMU_DATA" "$@"; fi
    "$QEMU" "$@" 2> "$WORK/vmm.err" &
    pid=$!
}
# Waits for the guest to write, then hangs the host device; sets $hung_at.
hang_after_records() {
    wait_for 60 "the second disk never answered" vdb_at_least 2
    break_storage_after suspend_host 30
    hung_at=$(date +%s)
    echo "HANG the host device suspended (--noflush) after $(acks) acknowledged records"
}
vdb_at_least() { [ "$(vdb)" -ge "$1" ]; }
finish_and_check() { # $1: what ran
    wait_exit
    grep -q "GUEST WORKLOAD OK" "$CONSOLE" || fail "$1: the guest's workload did not finish"
    check_records
    [ "$lost" = 0 ] || fail "$1: acknowledged records lost: $lost"
    echo "RECORDS $1: $acked acknowledged, all intact after remount"
}

host_setup

# 1. holdfast, no hang-timeout.
copy_image
start_holdfast_hang ""
hang_after_records
acks_before=$(acks) vdb_before=$(vdb) worst=0 outstanding=no
while [ $(($(date +%s) - hung_at)) -lt $HANG_S ]; do
    for c in query-status query-block; do
        t=$(ms "$c")
        [ -n "$t" ] || fail "holdfast did not answer $c during the hang"
        worst=$(echo "$t $worst" | awk '{ print ($1 > $2) ? $1 : $2 }')
    done
    q query-block | grep -q '"x-outstanding": *{"operation": *"flush"' && outstanding=yes
    sleep 1
done
acks_during=$(($(acks) - acks_before)) vdb_during=$(($(vdb) - vdb_before))
# stop while the call still hangs: answered at once, the VM pauses; cont is refused
# until the call returns.
stop_ms=$(ms stop)
[ -n "$stop_ms" ] && [ "$(state)" = paused ] || fail "stop during the hang did not pause the VM"
q cont 2>&1 | grep -q outstanding || fail "cont during the hang was not refused naming the call"
resume_host
wait_for 60 "cont after the hang never succeeded" q cont
echo "HOLDFAST no hang-timeout: during the ${HANG_S} s hang QMP answered every command, the slowest in $worst ms, stop in $stop_ms ms; query-block named the outstanding flush: $outstanding; the data disk acknowledged $acks_during records, the second disk $vdb_during writes"
[ "$outstanding" = yes ] || fail "query-block never showed the outstanding flush"
[ "$acks_during" -le 1 ] || fail "the hang did not hold the guest's records ($acks_during acknowledged during it)"
[ "$vdb_during" -ge 10 ] || fail "the second disk stalled with the first ($vdb_during writes in ${HANG_S} s)"
awk -v w="$worst" -v s="$stop_ms" 'BEGIN { exit !(w < 1000 && s < 1000) }' || fail "QMP took $worst ms (stop $stop_ms ms) to answer during the hang"
finish_and_check "holdfast without hang-timeout"
reports_without=$(hung_tasks)
echo "HOLDFAST no hang-timeout: the guest's kernel reported $reports_without hung tasks"
[ "$reports_without" -ge 1 ] || fail "the guest reported no hung task without hang-timeout: the check below would mean nothing"

# 2. holdfast with hang-timeout=3.
copy_image
start_holdfast_hang ",hang-timeout=3"
hang_after_records
wait_for 30 "holdfast did not pause on the hang" in_state io-error
paused_after=$(($(date +%s) - hung_at))
grep -q "outstanding for" "$WORK/vmm.err" || fail "holdfast did not say which call hung"
refused=$(q cont 2>&1)
echo "$refused" | grep -q "outstanding" || fail "cont during the hang was not refused naming the call: $refused"
[ "$(state)" = io-error ] || fail "a refused cont changed the run state"
while [ $(($(date +%s) - hung_at)) -lt $HANG_S ]; do sleep 1; done
resume_host
wait_for 60 "cont after the hang never succeeded" q cont
echo "HOLDFAST hang-timeout=3: paused ${paused_after} s into the hang, cont refused while it hung (\"$(echo "$refused" | sed -n 's/.*"desc": *"\([^"]*\)".*/\1/p' | cut -c1-90)...\"), resumed after"
finish_and_check "holdfast with hang-timeout=3"
reports_with=$(hung_tasks)
echo "HOLDFAST hang-timeout=3: the guest's kernel reported $reports_with hung tasks"
[ "$reports_with" = 0 ] || fail "with hang-timeout the guest still reported hung tasks: $(grep 'blocked for more than' "$CONSOLE" | head -n 2)"

# 3. QEMU 10 on the same hang.
copy_image
start_qemu_hang
hang_after_records
qemu_vdb_before=$(vdb)
sleep 5
# QEMU's stop may wait for the hung I/O: asked in the background, answered when it is.
ms stop > "$WORK/stop.ms" &
stopper=$!
while [ $(($(date +%s) - hung_at)) -lt $HANG_S ]; do sleep 1; done
stopped_before_resume=no
[ -s "$WORK/stop.ms" ] && stopped_before_resume=yes
qemu_vdb_during=$(($(vdb) - qemu_vdb_before))
resume_host
wait "$stopper"
[ -s "$WORK/stop.ms" ] || fail "QEMU's stop failed"
qemu_stop_ms=$(cat "$WORK/stop.ms")
echo "QEMU: stop, asked 5 s into the hang, answered after $qemu_stop_ms ms (before the storage came back: $stopped_before_resume); its second disk took $qemu_vdb_during writes during the hang"
wait_for 60 "QEMU's cont failed" q cont
finish_and_check "QEMU"
reports_qemu=$(hung_tasks)
echo "QEMU: the guest's kernel reported $reports_qemu hung tasks"
# 4. quit while the call hangs: answered at once; holdfast says what it cannot
# settle within seconds (a call stuck in the kernel cannot be cancelled); the process
# itself ends when the kernel lets the stuck call go.
copy_image
start_holdfast_hang ""
hang_after_records
sleep 3
quit_ms=$(ms quit)
[ -n "$quit_ms" ] || fail "quit during the hang was not answered"
quit_at=$(date +%s)
wait_for 15 "holdfast did not say what it could not settle" grep -q "unflushed bytes dropped" "$WORK/vmm.err"
said_after=$(($(date +%s) - quit_at))
grep -q "cannot be cancelled" "$WORK/vmm.err" || fail "holdfast did not say the hung call cannot be cancelled"
resume_host
wait_exit
[ "$status" -eq 6 ] || fail "quit during the hang: holdfast exited $status, not 6 (bytes dropped)"
check_records
[ "$lost" = 0 ] || fail "quit during the hang lost acknowledged records: $lost"
echo "HOLDFAST quit during the hang: answered in $quit_ms ms; said what it could not settle ${said_after} s later; exit 6; $acked acknowledged records intact"
host_teardown
echo "SCENARIO OK $NAME: a ${HANG_S} s hang; holdfast without hang-timeout answered QMP in at most $worst ms and its second disk went on ($vdb_during writes), its guest reported $reports_without hung tasks; with hang-timeout=3 it paused after ${paused_after} s, refused cont until the call returned, and its guest reported none; QEMU's stop took $qemu_stop_ms ms, its guest reported $reports_qemu hung tasks; quit during the hang answered in $quit_ms ms; every acknowledged record intact"
