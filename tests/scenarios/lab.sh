# holdfast lab on the default guest and a simulated XFS host: the records workload
# (fdatasync per record, ACK n), the host's write-back failing (flush EIO) after
# record 40 for 3 s, the operator `cont`ing every 2 s; holdfast and an imitation of
# QEMU's werror=stop (retry-flush) side by side. The second boot lists which records
# survived. holdfast must keep all of them; retry-flush must show the loss the
# simulated host causes (else the scenario proves nothing).
set -u -o pipefail
NAME=lab N=120
. "$(dirname "$0")/lab.lib"
lab_scenario '["simulated:xfs"]' '["holdfast", "retry-flush"]' \
    '[{"kind": "flush-eio", "when": {"line": "ACK 40"}, "lasts": "6s"}]' '{"cont_after": "2s", "tries": 3}'
lab_run
hf=$(row simulated:xfs holdfast flush-eio) rf=$(row simulated:xfs retry-flush flush-eio)
echo "LAB holdfast: $hf"
echo "LAB retry-flush: $rf"
[ "$status" -eq 0 ] || fail "holdfast lab exited with $status"
kept_all "$hf"
grep -q '"event": "BLOCK_IO_ERROR"' "$WORK/lab/results.json" || fail "no BLOCK_IO_ERROR: the outage never met the guest's I/O"
lost=$(field "$rf" 8) corrupt=$(field "$rf" 9)
[ "$lost" -gt 0 ] || [ "$corrupt" -gt 0 ] || [ "$(field "$rf" 10)" != "check ok" ] \
    || fail "retry-flush lost nothing on simulated XFS: the simulated host did not drop the failed pages"
ls "$WORK/lab/"*.svg > /dev/null || fail "no SVG timelines"
echo "SCENARIO OK lab: holdfast kept all $N acknowledged records; retry-flush (QEMU's werror=stop) lost $lost and left $corrupt damaged, check: $(field "$rf" 10)"
