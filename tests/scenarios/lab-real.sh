# holdfast lab on the real host: the default guest's records workload on an ext4 host
# file system (default options) that the lab makes on a dm device over a loop device;
# the host device fails every I/O (dm error table) after record 40 for 3 s (if ext4
# commits its journal meanwhile, it goes down, and the lab's operator detaches,
# repairs and attaches, as docs/durability.md says). holdfast, the imitation of QEMU's
# werror=stop (retry-flush) and QEMU 10 itself (default cache and cache=none) side by
# side; the check boots the guest again after the host file system was unmounted and
# mounted again (its page cache gone). Root.
set -u -o pipefail
NAME=lab-real N=120
. "$(dirname "$0")/lab.lib"
lab_scenario '["real"]' '["holdfast", "retry-flush", "qemu", "qemu-cache-none"]' \
    '[{"kind": "flush-eio", "when": {"line": "ACK 40"}, "lasts": "3s"}]' '{"cont_after": "2s", "tries": 3, "detach": true}'
lab_run
grep -q "lab: real host: ext4 (default options) on dm holdfast-lab-" "$WORK/lab.log" || fail "the lab did not say what it made"
for s in holdfast retry-flush qemu qemu-cache-none; do echo "LAB $s: $(row real "$s" flush-eio)"; done
[ "$status" -eq 0 ] || fail "holdfast lab exited with $status"
kept_all "$(row real holdfast flush-eio)"
grep -q '"event": "BLOCK_IO_ERROR"' "$WORK/lab/results.json" || fail "no BLOCK_IO_ERROR: the outage never met the guest's I/O"
nothing_left
q=$(row real qemu flush-eio) qn=$(row real qemu-cache-none flush-eio)
echo "SCENARIO OK lab-real: holdfast kept all $N acknowledged records on real ext4; retry-flush: $(field "$(row real retry-flush flush-eio)" 8) lost, QEMU: $(field "$q" 8) lost (resumed: $(field "$q" 5)), QEMU cache=none: $(field "$qn" 8) lost (resumed: $(field "$qn" 5))"
