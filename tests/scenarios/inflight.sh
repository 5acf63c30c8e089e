# Many writes in flight at 512-byte granularity (docs/durability.md, "Requests in
# flight"): the guest's `workload sectors` runs 16 threads on its raw disk (vda, a
# 32 MiB image on the host's ext4 over device-mapper), 12 with O_DIRECT (fdatasync
# every 8th write) and 4 buffered (fdatasync each), each write 512 bytes to 1 MiB at
# 512-byte offsets, neighbours in one 4 KiB block and overlaps on purpose, every
# acknowledged write printed (A lines). holdfast must have had at least 4 host calls
# in flight at once (x-query-unflushed's peak-in-flight), and with 4 KiB blocks
# requests that waited for a call they met in one (held-back), or the scenario
# fails: it cannot pass without what it tests. Three phases, the host's doing in each, halfway through (the
# guest waits at its gate, vdb, then the second half's writes meet it):
#   1. slow storage (dm-delay, 2 ms a call): many writes in flight, and host calls
#      that sleep, so that others run between them even on the test host's one CPU;
#   2. an error outage: the dm table fails every call for a few seconds, then `cont`
#      (if the host ext4 went down with it, the operator's repair under holdfast);
#   3. a hang: the dm device suspended with --noflush for 8 s; holdfast with
#      hang-timeout=3 pauses, then `cont` once it returned.
# Afterwards the host drops its page cache, remounts its file system, and checks
# every acknowledged sector in the image (workload verify-sectors): the sector holds
# that write, or one the guest made after it was acknowledged.
# holdfast with cache=none and O_DIRECT aligned to 4 KiB (x-direct-align=4096: a
# 512-byte write is then a read-modify-write of a host block, as on 4K-native
# storage), and with the default writeback cache: nothing lost, every phase's pause
# seen. QEMU 10 (werror=stop) with cache=none and its default cache on the same
# workload: what it resumed and lost, in the same table. INFLIGHT_WRITES (default
# 240 a phase) and INFLIGHT_VARIANTS=all (adds holdfast cache=none at the host's own
# alignment) change the run.
set -u
NAME=inflight
. "$(dirname "$0")/outage.lib"
WRITES=${INFLIGHT_WRITES:-240}
RAW="$WORK/host/raw.img"
CMDLINE_SECTORS="console=ttyS0 panic=-1 quiet holdfast.workload=sectors holdfast.sectors=3,$WRITES,16 holdfast.gate=vdb:1"
suspend_host() { dmsetup suspend --noflush --nolockfs "$DM_HOST" || fail "cannot suspend the host device"; }
resume_host() { dmsetup resume "$DM_HOST" || fail "cannot resume the host device"; }
sector_acks() { n=$(grep -c "^A " "$CONSOLE" 2>/dev/null); echo "${n:-0}"; }

# A zeroed, fully written image (no allocation during an outage), and the VMM on it:
# $1 holdfast or qemu, $2 the data disk's extra options.
start_vmm() {
    dd if=/dev/zero of="$RAW" bs=1M count=32 status=none && sync || fail "cannot make the raw image"
    rm -f "$CONSOLE"
    new_gate
    if [ "$1" = holdfast ]; then
        "$HOLDFAST" run --kernel "$GUEST/vmlinuz" --initrd "$GUEST/initramfs.cpio.gz" --mem 256M \
            --disk "path=$RAW,id=data$2" --disk "path=$GATE,id=gate" --qmp "$SOCK" \
            --serial "file:$CONSOLE" --cmdline "$CMDLINE_SECTORS" 2> "$WORK/vmm.err" &
    else
        set -- -M microvm,acpi=on -enable-kvm -cpu host -m 256 -display none -monitor none -no-reboot \
            -kernel "$GUEST/vmlinuz" -initrd "$GUEST/initramfs.cpio.gz" -append "$CMDLINE_SECTORS" \
            -drive "file=$RAW,if=none,id=data,format=raw,werror=stop,rerror=stop$2" \
            -device virtio-blk-device,drive=data \
            -drive "file=$GATE,if=none,id=gate,format=raw" -device virtio-blk-device,drive=gate \
            -serial "file:$CONSOLE" -qmp "unix:$SOCK,server=on,wait=off"
        if [ -n "${QEMU_DATA:-}" ]; then set -- -L "$QEMU_DATA" "$@"; fi
        "$QEMU" "$@" 2> "$WORK/vmm.err" &
    fi
    pid=$!
}
# Waits for the guest at its next gate (phase $1 halfway).
at_phase_gate() { wait_for 600 "the guest never reached phase $1's gate ($(sector_acks) acknowledged writes)" at_gate; }
# cont until the VMM runs (at most 3 tries, 5 s apart); sets $resumed.
cont_until_running() {
    resumed=no
    for attempt in 1 2 3; do
        q cont > /dev/null 2>&1
        sleep 1
        s=$(state)
        if [ "$s" = running ] || [ -z "$s" ]; then resumed=yes; return 0; fi
        sleep 4
    done
}

# One VMM through the three phases; sets row_resumed, row_finished, row_acked, row_lost,
# row_paused (what each breaking phase did to the run state).
run_phases() { # label, holdfast|qemu, extra disk options
    label=$1 kind=$2
    start_vmm "$kind" "$3"
    # Phase 1, slow storage (every call waits 2 ms in dm-delay): host calls that
    # sleep let others run between them, as on a machine with many CPUs.
    at_phase_gate 1
    table "delay /dev/mapper/$DM_INNER 0 2" || fail "cannot slow the host device down"
    open_gate
    echo "INFLIGHT $label phase 1 (slow storage, no outage) under way"
    at_phase_gate 2
    linear || fail "cannot end the slow phase"
    echo "INFLIGHT $label phase 2: $(sector_acks) writes acknowledged; the outage starts"
    table error || fail "cannot start the outage"
    open_gate
    wait_for 120 "$label did not stop on the outage" in_state io-error
    sleep 2
    echo "OUTAGE $label stopped (io-error) after $(sector_acks) acknowledged writes"
    row_paused="error: io-error"
    if [ "$kind" = holdfast ]; then
        end_outage
        holdfast_cont_after_outage
        resumed=yes
    else
        linear || fail "cannot end the outage"
        cont_until_running
    fi
    row_resumed=$resumed
    echo "OUTAGE $label ended; resumed: $resumed"
    if [ "$resumed" = yes ]; then
        at_phase_gate 3
        # holdfast says how many host calls ran beside each other at most, and how
        # many requests waited because they met one in a host block (x-query-unflushed).
        if [ "$kind" = holdfast ]; then
            u=$(q x-query-unflushed)
            # The data disk comes first.
            row_peak=$(echo "$u" | grep -o '"peak-in-flight": *[0-9]*' | head -n 1 | grep -o '[0-9]*$')
            row_held=$(echo "$u" | grep -o '"held-back": *[0-9]*' | head -n 1 | grep -o '[0-9]*$')
            echo "INFLIGHT $label: at most ${row_peak:-?} host calls in flight at once; ${row_held:-?} requests waited for a call they met"
        fi
        echo "INFLIGHT $label phase 3: $(sector_acks) writes acknowledged; the host device hangs"
        suspend_host
        open_gate
        hung_at=$(date +%s)
        if [ "$kind" = holdfast ]; then
            wait_for 60 "holdfast did not pause on the hang" in_state io-error
            row_paused="$row_paused, hang: io-error after $(($(date +%s) - hung_at)) s"
        fi
        while [ $(($(date +%s) - hung_at)) -lt 8 ]; do sleep 1; done
        resume_host
        echo "HANG $label: the host device answers again"
        if [ "$kind" = holdfast ]; then
            wait_for 60 "cont after the hang never succeeded" q cont
        else
            row_paused="$row_paused, hang: $(state)"
            [ "$(state)" = running ] || cont_until_running
        fi
        wait_exit
        row_finished=$(grep -q "GUEST WORKLOAD OK" "$CONSOLE" && echo yes || echo no)
    else
        q quit
        wait_exit
        row_finished=no
    fi
    check_sectors
    row_acked=$acked row_lost=$lost
    echo "INFLIGHT $label: resumed $row_resumed, finished $row_finished, $row_acked acknowledged writes, lost: $row_lost"
}

# After the VMM exited: the host's page cache dropped and its file system remounted
# (repaired if it went down), then every acknowledged sector checked. Sets $acked
# and $lost (acknowledged writes with a lost sector).
check_sectors() {
    acked=$(sector_acks)
    down=no
    host_fs_down && down=yes
    sync
    i=0
    until umount "$WORK/host" 2>/dev/null; do
        sleep 1; i=$((i + 1))
        [ $i -lt 20 ] || fail "cannot unmount the host file system"
    done
    [ "$down" = yes ] && host_fs_repair
    drop_page_cache
    mount_host || fail "cannot remount the host file system"
    out=$("$WORKLOAD" verify-sectors "$RAW" "$CONSOLE" 2>&1)
    echo "$out" | head -n 12
    lost=$(echo "$out" | sed -n 's/.*, \([0-9]*\) acked writes lost.*/\1/p')
    [ -n "$lost" ] || lost="unknown: $(echo "$out" | tail -n 1)"
}

holdfast_run() { # label, options, least requests that must have waited (met a call)
    run_phases "$1" holdfast ",hang-timeout=3$2"
    [ "$status" -eq 0 ] || fail "$1: holdfast exited with $status"
    # The scenario is about many calls at once: it must have had them.
    [ "${row_peak:-0}" -ge 4 ] || fail "$1: at most ${row_peak:-0} host calls were in flight at once: not what this scenario tests"
    [ "${row_held:-0}" -ge "$3" ] || fail "$1: only ${row_held:-0} requests met a call in flight (at least $3 expected)"
    [ "$row_finished" = yes ] || fail "$1: the guest's workload did not finish"
    [ "$row_lost" = 0 ] || fail "$1: acknowledged writes lost: $row_lost"
    echo "$1|$row_resumed|$row_finished|$row_acked|$row_lost" >> "$ROWS"
    summary="$summary; $1: $row_acked acknowledged writes intact, up to $row_peak calls in flight, $row_held held back ($row_paused)"
}

ROWS="$WORK/rows"
: > "$ROWS"
summary=
host_setup
# With 4 KiB host blocks, neighbouring sectors in one must have met.
holdfast_run "holdfast cache=none, 4 KiB" ",cache=none,x-direct-align=4096" 1
holdfast_run "holdfast writeback" "" 0
[ "${INFLIGHT_VARIANTS:-}" != all ] || holdfast_run "holdfast cache=none" ",cache=none" 0
for cache in none ""; do
    label="QEMU werror=stop${cache:+ cache=$cache}"
    # A host file system that went down under QEMU was repaired in check_sectors;
    # each run starts on a fresh one.
    host_teardown
    host_setup
    run_phases "$label" qemu "${cache:+,cache=$cache}"
    echo "$label|$row_resumed|$row_finished|$row_acked|$row_lost" >> "$ROWS"
    summary="$summary; $label: resumed $row_resumed, lost $row_lost of $row_acked"
done
host_teardown
compare_row "many writes in flight" resumed "workload finished" "acked writes" "acked writes lost"
while IFS='|' read -r a b c d e; do
    compare_row "$a" "$b" "$c" "$d" "$e"
done < "$ROWS"
echo "SCENARIO OK $NAME: 16 threads, writes of 512 bytes to 1 MiB at 512-byte offsets, through no outage, an error outage and a hang${summary}"
