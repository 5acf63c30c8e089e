# Real outages driven by a real third-party QMP client: QEMU's Python library
# qemu.qmp (its async QMPClient for a first outage, its legacy QEMUMonitorProtocol
# for a second one in the same guest) runs outside the test host
# (outage-client.client.py) and reaches holdfast's socket over a virtio-serial port,
# bridged here by `workload relay`; a second port is the control channel between
# that client and this script (on the direct path: the socket itself and two FIFOs).
# This script makes and ends each outage when the client says; the client checks
# BLOCK_IO_ERROR then STOP, query-status/query-block/x-query-unflushed, a refused
# cont while broken, then cont, X_BLOCK_REPLAY and RESUME. Every acknowledged
# record must be intact afterwards.
set -u
NAME=outage-client
RECORDS=600 # the guest must still be running for the second outage
GATE_AT=250,550 # (and cannot finish before either outage started)
. "$(dirname "$0")/outage.lib"
port_named() {
    for d in /sys/class/virtio-ports/*; do
        [ "$(cat "$d/name" 2>/dev/null)" = "$1" ] && echo "/dev/$(basename "$d")"
    done
}
if [ -n "${CTL_IN:-}" ]; then
    exec 3< "$CTL_IN" 4> "$CTL_OUT"
    qmp_port=
else
    load_modules client
    ctl_port=$(port_named holdfast.ctl)
    qmp_port=$(port_named holdfast.qmp)
    [ -n "$ctl_port" ] && [ -n "$qmp_port" ] || fail "no virtio-serial ports holdfast.ctl and holdfast.qmp"
    exec 3<> "$ctl_port" 4>&3
fi
say() { echo "$1" >&4; }
hear() { # the client's next word (a virtio port reads EOF while its host side is away)
    i=0
    until read -r word <&3; do sleep 0.2; i=$((i + 1)); [ $i -lt 900 ] || fail "the client said nothing"; done
    case "$word" in "$1") ;; *) fail "the client said '$word', not '$1'" ;; esac
}
hear hello
host_setup
copy_image
start_holdfast
wait_for 60 "holdfast's QMP socket never appeared" test -S "$SOCK"
relay=
bridge() { # (re)starts the bridge to the QMP port; a relay ends with its connection
    if [ -n "$qmp_port" ]; then
        [ -n "$relay" ] && wait_for 30 "the previous relay did not end" relay_gone
        "$WORKLOAD" relay "$qmp_port" "$SOCK" &
        relay=$!
    fi
}
relay_gone() { ! kill -0 "$relay" 2>/dev/null; }
# One outage, driven by the client: it starts once $1 records are acknowledged.
client_outage() {
    bridge
    say started
    hear connected
    break_storage_after "table error" "$1"
    echo "OUTAGE started after $(acks) acknowledged records"
    say outage
    hear end-outage
    end_outage # the host file system may have gone down: detach, repair, attach here
    say ended
}
# The client's next word after `ended` is $1; before it, it may say `recheck`: its
# cont failed, and the host file system may have gone down after end_outage found
# it working (a journal commit that met the outage ends a moment later).
hear_after_ended() {
    while :; do
        i=0
        until read -r word <&3; do sleep 0.2; i=$((i + 1)); [ $i -lt 900 ] || fail "the client said nothing"; done
        [ "$word" = recheck ] || break
        if host_fs_down; then
            repair_host_fs_under_holdfast
            echo "OUTAGE the host file system went down after the outage ended: detached, repaired, attached"
            say repaired
        else
            say not-down
        fi
    done
    case "$word" in "$1") ;; *) fail "the client said '$word', not '$1'" ;; esac
}
client_outage 30
hear_after_ended async-done
client_outage $(($(acks) + 20))
hear_after_ended done
holdfast_outage_finish
host_teardown
echo "SCENARIO OK $NAME: qemu.qmp's QMPClient and then its legacy QEMUMonitorProtocol each saw BLOCK_IO_ERROR and STOP, were refused cont while storage was broken, resumed the guest after the outage; $acked acknowledged records intact after remount"
