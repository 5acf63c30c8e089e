# The outage path's latencies, on a real guest in the test host. The guest writes
# 1, 16 and 128 MiB to its disk (O_DIRECT, no flush: holdfast buffers all of it),
# then flushes; a one-shot flush fault armed over QMP makes that host flush fail.
# Measured by holdfast (x-query-timings): the failing host call's return to every
# vCPU parked, and `cont` to the vCPUs released (the replay: rewrite and flush of the
# buffered bytes). The replay's rate is compared with a plain sequential write
# (1 MiB pwrites + fdatasync, `workload seqwrite`) of the same size on the same host
# file system, measured in the same run once the guest is done: once from one 1 MiB
# buffer, once from as much distinct memory as the replay reads.
set -u
NAME=bench-outage
RECORDS=0
. "/scenarios/outage.lib"
SIZES="1 16 128"
RUNS=3 # per size; medians are reported
BURSTS=$(for mib in $SIZES; do for r in $(seq $RUNS); do printf '%s,' "$mib"; done; done)
BURSTS=${BURSTS%,}
host_setup
dd if=/dev/zero of="$IMG" bs=1M count=160 2>/dev/null && sync || fail "cannot make the image"
"$HOLDFAST" run --kernel "$GUEST/vmlinuz" --initrd "$GUEST/initramfs.cpio.gz" --mem 256M \
    --disk "path=$IMG,id=data,unflushed-limit=256M" --qmp "$SOCK" --serial "file:$CONSOLE" \
    --cmdline "console=ttyS0 panic=-1 holdfast.workload=burst holdfast.burst=$BURSTS" &
pid=$!
field() { sed -n "s/.*\"$1\": *\([0-9]*\).*/\1/p"; }
# A whole console line (the serial console ends lines with CR LF).
console_has() { [ -f "$CONSOLE" ] && tr -d '\r' < "$CONSOLE" | grep -qx "$1"; }
ms() { awk -v ns="$1" 'BEGIN { printf "%.2f", ns / 1e6 }'; }
: > "$WORK/bench.dat"
k=0
for mib in $(echo "$BURSTS" | tr , ' '); do
    k=$((k + 1))
    wait_for 100 "the guest never started its $mib MiB burst" console_has "BURST WRITING $k $mib"
    q x-block-fault '{"device": "data", "arm": {"name": "bench", "op": "flush", "errno": "EIO", "when": "once"}}' \
        > /dev/null || fail "cannot arm the fault"
    wait_for 100 "holdfast did not stop on the failed flush after $mib MiB" in_state io-error
    console_has "BURST WRITTEN $k $mib" || fail "stopped before the guest wrote its $mib MiB"
    buffered=$(q x-query-unflushed | field bytes)
    q cont > /dev/null || fail "cont failed"
    t=$(q x-query-timings)
    stop_ns=$(echo "$t" | field error-to-stopped-ns)
    cont_ns=$(echo "$t" | field cont-to-running-ns)
    replay_bytes=$(echo "$t" | field replay-bytes)
    replay_ns=$(echo "$t" | field replay-ns)
    wait_for 100 "the guest's flush after $mib MiB never returned" console_has "BURST FLUSHED $k $mib"
    [ "$buffered" -ge $((mib * 1048576)) ] || fail "only $buffered bytes buffered for a $mib MiB burst"
    echo "run: $mib MiB buffered ($buffered bytes): error -> stopped $(ms "$stop_ns") ms, cont -> running" \
        "$(ms "$cont_ns") ms, replay $(ms "$replay_ns") ms"
    echo "$mib $stop_ns $cont_ns $replay_bytes $replay_ns" >> "$WORK/bench.dat"
done
wait_exit
[ "$status" -eq 0 ] || fail "holdfast exited with $status"
grep -q "GUEST WORKLOAD OK" "$CONSOLE" || fail "the guest's bursts did not finish"
# The baselines, once the guest is done (run between its bursts they made it miss
# its window), on the same host file system.
: > "$WORK/seq.dat"
for mib in $(echo "$BURSTS" | tr , ' '); do
    seq=$("$WORKLOAD" seqwrite "$WORK/host/seq.img" "$mib")
    rm -f "$WORK/host/seq.img"
    seq_ns=$(echo "$seq" | awk '/^SEQWRITE/ { print $3 }')
    seqd_ns=$(echo "$seq" | awk '/^SEQWRITE/ { print $4 }')
    [ -n "$seqd_ns" ] || fail "the sequential write baseline failed"
    echo "baseline: $mib MiB sequential write $(ms "$seq_ns") ms (from distinct memory $(ms "$seqd_ns") ms)"
    echo "$mib $seq_ns $seqd_ns" >> "$WORK/seq.dat"
done
median() { sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
for mib in $SIZES; do
    col() { awk -v m="$mib" -v c="$2" '$1 == m { print $c }' "$WORK/$1" | median; }
    stop_ns=$(col bench.dat 2) cont_ns=$(col bench.dat 3) replay_bytes=$(col bench.dat 4) replay_ns=$(col bench.dat 5)
    seq_ns=$(col seq.dat 2) seqd_ns=$(col seq.dat 3)
    rate_ratio() { awk -v rb="$replay_bytes" -v rn="$replay_ns" -v sb=$((mib * 1048576)) -v sn="$1" \
        'BEGIN { printf "%.2f", (rb / rn) / (sb / sn) }'; }
    ratio=$(rate_ratio "$seq_ns") ratiod=$(rate_ratio "$seqd_ns")
    echo "BENCH outage, $mib MiB buffered (medians of $RUNS): error -> vCPUs stopped $(ms "$stop_ns") ms;" \
        "cont -> running $(ms "$cont_ns") ms (replay $(ms "$replay_ns") ms); sequential write of $mib MiB" \
        "$(ms "$seq_ns") ms; replay rate / sequential write rate = $ratio" \
        "($ratiod against a sequential write from $mib MiB of distinct memory, $(ms "$seqd_ns") ms)"
done
host_teardown
echo "SCENARIO OK bench-outage"
