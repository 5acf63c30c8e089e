# holdfast lab when the outage takes the host file system down: the default guest's
# records on the lab's real ext4 host; the host device fails until the kernel says
# ext4 aborted its journal (at most 90 s), then works again while the file system
# stays down. The lab's operator detaches the disk, unmounts, e2fscks, mounts and
# attaches it, then conts (docs/durability.md). QEMU 10 beside it cannot let go of its
# image. Root.
set -u -o pipefail
NAME=lab-fs-down N=300
. "$(dirname "$0")/lab.lib"
lab_scenario '["real"]' '["holdfast", "qemu"]' \
    '[{"kind": "fs-down", "when": {"line": "ACK 30"}, "lasts": "90s"}]' '{"cont_after": "2s", "tries": 3, "detach": true}'
lab_run
hf=$(row real holdfast fs-down) qf=$(row real qemu fs-down)
echo "LAB holdfast: $hf"
echo "LAB qemu: $qf"
[ "$status" -eq 0 ] || fail "holdfast lab exited with $status"
grep -q "lab: host file system down: .*\(Aborting journal\|read-only\)" "$WORK/lab.log" || fail "the lab did not see the host ext4 go down"
kept_all "$hf"
grep -q '"event": "detach"' "$WORK/lab/results.json" && grep -q '"event": "attach"' "$WORK/lab/results.json" \
    || fail "the operator's detach and attach are not in the timeline"
nothing_left
echo "SCENARIO OK lab-fs-down: the host ext4 went down; after detach, repair, attach holdfast resumed and kept all $N acknowledged records; QEMU: resumed $(field "$qf" 5), $(field "$qf" 7) acknowledged, $(field "$qf" 8) lost, check: $(field "$qf" 10)"
