# holdfast lab on the default guest and a simulated XFS host: the records workload
# (fdatasync per record, ACK n), the host's write-back failing (flush EIO) after
# record 40 for 3 s, the operator `cont`ing every 2 s; holdfast and an imitation of
# QEMU's werror=stop (retry-flush) side by side. The second boot lists which records
# survived. holdfast must keep all of them; retry-flush must show the loss the
# simulated host causes (else the scenario proves nothing).
# Needs HOLDFAST, GUEST, WORK. Prints SCENARIO OK or SCENARIO FAIL.
set -u -o pipefail
fail() { echo "SCENARIO FAIL lab: $*"; exit 1; }
N=120
cat > "$WORK/records.json" <<JSON
{
  "name": "records",
  "seed": 1,
  "guest": {
    "kernel": "$GUEST/vmlinuz", "initrd": "$GUEST/initramfs.cpio.gz", "memory": "256M",
    "cmdline": "console=ttyS0 panic=-1 holdfast.workload=records holdfast.records=$N",
    "disks": [{"id": "data", "image": "$GUEST/disk.img"}]
  },
  "progress": {"ready": "GUEST WORKLOAD START", "ack": "ACK "},
  "outages": [{"kind": "flush-eio", "when": {"line": "ACK 40"}, "lasts": "3s"}],
  "operator": {"cont_after": "2s", "tries": 3},
  "verify": {"boot": {"cmdline": "console=ttyS0 panic=-1 holdfast.workload=check-records",
                      "ok": "CHECK OK", "have": "HAVE ", "corrupt": "CORRUPT "}},
  "hosts": ["simulated:xfs"],
  "strategies": ["holdfast", "retry-flush"],
  "timeout": "10m"
}
JSON
"$HOLDFAST" lab --out "$WORK/lab" "$WORK/records.json" 2>&1 | tee "$WORK/lab.log"
status=$?
[ -f "$WORK/lab/results.md" ] || fail "no results.md (holdfast lab exited with $status)"
row() { grep "^| simulated:xfs | $1 | flush-eio |" "$WORK/lab/results.md"; }
# | host | strategy | outage | resumed | errors | acked | lost | corrupt | verification |
field() { echo "$1" | awk -F'|' -v f="$2" '{ gsub(/^ +| +$/, "", $f); print $f }'; }
hf=$(row holdfast) || fail "no holdfast row"
rf=$(row retry-flush) || fail "no retry-flush row"
echo "LAB holdfast: $hf"
echo "LAB retry-flush: $rf"
[ "$status" -eq 0 ] || fail "holdfast lab exited with $status"
[ "$(field "$hf" 5)" = yes ] || fail "holdfast did not resume"
[ "$(field "$hf" 7)" = "$N" ] || fail "holdfast: $(field "$hf" 7) of $N records acknowledged"
[ "$(field "$hf" 8)" = 0 ] && [ "$(field "$hf" 9)" = 0 ] || fail "holdfast lost or damaged records"
[ "$(field "$hf" 10)" = "check ok" ] || fail "holdfast: the second boot's check: $(field "$hf" 10)"
grep -q "cont failed" "$WORK/lab/results.json" || fail "no cont was refused: the outage never met a flush"
lost=$(field "$rf" 8); corrupt=$(field "$rf" 9)
[ "$lost" -gt 0 ] || [ "$corrupt" -gt 0 ] || [ "$(field "$rf" 10)" != "check ok" ] \
    || fail "retry-flush lost nothing on simulated XFS: the simulated host did not drop the failed pages"
ls "$WORK/lab/"*.svg > /dev/null || fail "no SVG timelines"
echo "SCENARIO OK lab: holdfast kept all $N acknowledged records; retry-flush (QEMU's werror=stop) lost $lost and left $corrupt damaged, check: $(field "$rf" 10)"
