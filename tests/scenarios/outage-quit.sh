# Ending holdfast while the guest is stopped on a real outage. `quit` over QMP and
# SIGTERM while storage is still broken must end holdfast with status 6 and say how
# many unflushed bytes they drop; SIGTERM after the outage ended (the VM still
# paused) settles the disk: the buffered bytes are written and flushed, holdfast exits
# 0, and every acknowledged record is intact after a remount (if the host file
# system went down with the outage, after the operator's detach, repair and attach).
set -u
NAME=outage-quit
. "$(dirname "$0")/outage.lib"
host_setup
stopped_on_outage() { # starts holdfast on a fresh image, breaks storage, waits for the stop
    copy_image
    start_holdfast
    break_storage_after "table error" 30
    wait_for 60 "holdfast did not stop on the outage" in_state io-error
    echo "OUTAGE holdfast stopped (io-error) after $(acks) acknowledged records"
}
drops_bytes() { # holdfast exited 6 and said how many bytes it dropped
    [ "$status" -eq 6 ] || fail "$1 with unflushable bytes: holdfast exited $status, not 6"
    grep -q "disk data: [1-9][0-9]* unflushed bytes dropped" "$WORK/vmm.err" \
        || fail "$1 with unflushable bytes: holdfast did not say how many it dropped"
}

stopped_on_outage
q quit || fail "quit failed"
wait_exit
drops_bytes "quit"
end_outage_after_exit
echo "QUIT while broken: exit 6, $(sed -n 's/.*disk data: \([0-9]*\) unflushed bytes dropped.*/\1/p' "$WORK/vmm.err" | head -n 1) bytes dropped, said so"

stopped_on_outage
kill -TERM "$pid"
wait_exit
drops_bytes "SIGTERM"
end_outage_after_exit
echo "SIGTERM while broken: exit 6, dropped bytes reported"

stopped_on_outage
end_outage
kill -TERM "$pid"
wait_exit
[ "$status" -eq 0 ] || fail "SIGTERM after the outage ended: holdfast exited $status, not 0"
grep -q "ended by SIGTERM" "$WORK/vmm.err" || fail "SIGTERM: holdfast did not say it settled the disks"
check_records
[ "$lost" = 0 ] || fail "SIGTERM after the outage ended lost acknowledged records: $lost"
host_teardown
echo "SCENARIO OK $NAME: quit and SIGTERM while storage was broken exit 6 and report the bytes they drop; SIGTERM after the outage settled the disk and exited 0, $acked acknowledged records intact after remount"
