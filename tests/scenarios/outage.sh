# A real host storage outage under a running guest, holdfast and QEMU side by side.
# The guest's image lives on ext4 over a device-mapper linear device (on a RAM disk);
# the guest writes numbered, checksummed records with fdatasync and prints ACK n for
# each. Mid-run the dm table is swapped for an error table.
#
# holdfast must stop (io-error), refuse `cont` while storage is broken, refuse it
# again when the outage strikes again during the replay (the device is slowed with a
# dm delay table so the replay is still writing when the error table comes back),
# and resume on the `cont` after the outage ends; every ACKed record must then be
# intact after dropping the host page cache and remounting the host file system.
#
# Then the same outage under QEMU (werror=stop, default cache, and again with
# cache=none): the scenario prints whether it could resume and how many acknowledged
# records it lost, beside holdfast.
set -u
NAME=outage
. "$(dirname "$0")/outage.lib"
host_setup

# --- holdfast
holdfast_outage_until_refused_cont
# The outage ends (if the host file system went down with it, the operator repairs
# it under holdfast), but the device is slow: the replay's writes wait 3 s in
# dm-delay, and the outage strikes again (below the delay) 1 s into the replay.
end_outage
load_modules dm
table "delay /dev/mapper/$DM_INNER 0 3000" || fail "cannot load the delay table"
echo "OUTAGE device slowed down; cont, and the outage comes back during the replay"
q cont > "$WORK/cont.out" 2>&1 &
cont=$!
sleep 1
inner_table error || fail "cannot start the second outage"
if wait "$cont"; then cat "$WORK/cont.out"; fail "cont succeeded although the outage struck again during its replay"; fi
cat "$WORK/cont.out"
in_state io-error || fail "not paused after a replay that failed"
echo "OUTAGE struck again during the replay: cont refused, still paused"
end_outage
holdfast_cont_after_outage
holdfast_outage_finish
h_acked=$acked h_lost=$lost

# --- QEMU, the same outage: as Debian ships it (default cache), then with
# cache=none (O_DIRECT: docs/durability.md says only then can its later flushes succeed).
# Sets q_resumed, q_finished, q_acked, q_lost.
qemu_outage() {
    label="QEMU${1:+ cache=$1}"
    copy_image
    start_qemu "$1"
    break_storage_after "table error" 30 "the guest under $label"
    echo "OUTAGE ($label) started after $(acks) acknowledged records"
    wait_for 60 "$label did not stop on the outage" in_state io-error
    echo "OUTAGE ($label) stopped (io-error) after $(acks) acknowledged records"
    sleep 3
    q cont; sleep 3
    echo "OUTAGE ($label) cont while broken: now $(state)"
    linear || fail "cannot end the outage ($label)"
    echo "OUTAGE ($label) ended"
    q_resumed=no
    for attempt in 1 2 3; do
        q cont
        sleep 5
        s=$(state)
        echo "OUTAGE ($label) cont $attempt after the outage: ${s:-exited}, $(acks) acknowledged records"
        if [ "$s" = running ] || [ -z "$s" ]; then q_resumed=yes; break; fi
    done
    if [ "$q_resumed" = yes ]; then
        wait_exit
        q_finished=$(grep -q "GUEST WORKLOAD OK" "$CONSOLE" && echo yes || echo no)
    else
        q quit
        wait_exit
        q_finished=no
    fi
    check_records
    q_acked=$acked q_lost=$lost
}

qemu_outage ""
qemu_row="QEMU werror=stop: resumed $q_resumed, lost $q_lost of $q_acked"
set -- "QEMU werror=stop" "$q_resumed" "$q_finished" "$q_acked" "$q_lost"
qemu_outage none
host_teardown
compare_row "ext4 host outage" resumed "workload finished" acknowledged "acknowledged records lost"
compare_row "holdfast" yes yes "$h_acked" "$h_lost"
compare_row "$@"
compare_row "QEMU werror=stop cache=none" "$q_resumed" "$q_finished" "$q_acked" "$q_lost"
echo "SCENARIO OK outage: holdfast stopped on the outage, refused cont while broken and when it struck again during the replay, resumed; $h_acked acknowledged records intact after remount. $qemu_row; with cache=none: resumed $q_resumed, lost $q_lost of $q_acked"
