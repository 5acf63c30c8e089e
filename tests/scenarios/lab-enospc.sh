# holdfast lab, the host file system fills up: the default guest's records on the
# lab's real ext4 host (default options); after record 40 a file takes every free
# block of that file system for 3 s, so the guest's writes into the image's holes
# fail with ENOSPC (as on a full shared file system or a thin volume), then the file
# is deleted. holdfast pauses, and the operator's `cont` after the space came back
# writes again; QEMU 10 (werror=stop) beside it. Root.
set -u -o pipefail
NAME=lab-enospc N=120
. "$(dirname "$0")/lab.lib"
lab_scenario '["real"]' '["holdfast", "qemu"]' \
    '[{"kind": "write-enospc", "when": {"line": "ACK 40"}, "lasts": "3s"}]' '{"cont_after": "2s", "tries": 3}'
lab_run
hf=$(row real holdfast write-enospc) qf=$(row real qemu write-enospc)
echo "LAB holdfast: $hf"
echo "LAB qemu: $qf"
[ "$status" -eq 0 ] || fail "holdfast lab exited with $status"
grep -q "lab: host file system filled up" "$WORK/lab.log" || fail "the lab did not fill the host file system"
kept_all "$hf"
# The outage must have met the guest's writes: holdfast paused on ENOSPC.
grep -q '"event": "BLOCK_IO_ERROR"' "$WORK/lab/results.json" || fail "no BLOCK_IO_ERROR: the full file system never met the guest's writes"
grep -qi "ENOSPC\|no space left" "$WORK"/lab/runs/*/holdfast.log || fail "holdfast's log has no ENOSPC"
nothing_left
echo "SCENARIO OK lab-enospc: the host ext4 filled up after record 40 for 3 s; holdfast paused on ENOSPC and finished with all $N acknowledged records; QEMU: resumed $(field "$qf" 5), $(field "$qf" 7) acknowledged, $(field "$qf" 8) lost"
