# A stress for tests/standstills (not a benchmark, not in tests/run): the default
# guest writes fdatasync'd records while holdfast pauses and resumes it over QMP
# (stop, cont) every half second, 60 times, then boots it 5 times more; the nested
# test host's standstills were seen most right after an L2 guest started or was
# resumed (tests/README.md, "Standstills").
set -u
NAME=bench-pauses
GATE_AT=
RECORDS=100000
. /scenarios/outage.lib
cp "$GUEST/disk.img" "$WORK/disk.img"
IMG="$WORK/disk.img"
"$HOLDFAST" run --kernel "$GUEST/vmlinuz" --initrd "$GUEST/initramfs.cpio.gz" --mem 256M \
    --disk "path=$IMG,id=data" --qmp "$SOCK" --serial "file:$CONSOLE" --cmdline "$CMDLINE_RECORDS" 2> "$WORK/vmm.err" &
pid=$!
wait_for 120 "the guest never acknowledged a record" acked_at_least 1
for i in $(seq 1 60); do
    q stop > /dev/null || fail "stop $i"
    sleep 0.2
    q cont > /dev/null || fail "cont $i"
    sleep 0.3
done
echo "PAUSES 60 stops and conts, $(acks) records acknowledged"
q quit > /dev/null
wait "$pid"
for i in 1 2 3 4 5; do
    "$HOLDFAST" run --kernel "$GUEST/vmlinuz" --initrd "$GUEST/initramfs.cpio.gz" --mem 256M \
        --serial "file:$WORK/boot.log" --cmdline "console=ttyS0 panic=-1 holdfast.workload=none" || fail "boot $i"
done
echo "PAUSES 5 boots"
echo "SCENARIO OK bench-pauses"
