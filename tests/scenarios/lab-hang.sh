# holdfast lab with hung host storage: the default guest's records on the lab's real
# ext4 host; after record 40 every I/O of the host device waits for 20 s (a dm device
# suspended with --noflush: a hard NFS mount, a lost iSCSI path), then flows again.
# holdfast has no hang-timeout yet: the guest waits with it, nothing fails, nothing
# may be lost. QEMU 10 beside it. Root.
set -u -o pipefail
NAME=lab-hang N=120
. "$(dirname "$0")/lab.lib"
lab_scenario '["real"]' '["holdfast", "qemu"]' \
    '[{"kind": "hang", "when": {"line": "ACK 40"}, "lasts": "20s"}]' '{"cont_after": "2s", "tries": 3}'
lab_run
hf=$(row real holdfast hang) qf=$(row real qemu hang)
echo "LAB holdfast: $hf"
echo "LAB qemu: $qf"
[ "$status" -eq 0 ] || fail "holdfast lab exited with $status"
grep -q '"state": "hung"' "$WORK/lab/results.json" || fail "the host never hung"
kept_all "$hf"
# The hang must have met the guest's I/O: in holdfast's run (the first), the
# acknowledgements per second stop for most of the 20 s between the first and the last.
gap=$(awk '/"acks_per_second"/ { n++; on = (n == 1); next } on && /\]/ { on = 0 }
    on { v = $1 + 0; if (v > 0) { if (seen && zeros > best) best = zeros; zeros = 0; seen = 1 } else if (seen) zeros++ }
    END { print best + 0 }' "$WORK/lab/results.json")
echo "LAB longest stretch without an acknowledgement in holdfast's run: $gap s"
[ "$gap" -ge 10 ] || fail "the hang did not stop the guest's acknowledgements (longest gap $gap s)"
nothing_left
echo "SCENARIO OK lab-hang: the host storage hung for 20 s after record 40; holdfast finished with all $N acknowledged records; QEMU: finished $(field "$qf" 5), $(field "$qf" 7) acknowledged, $(field "$qf" 8) lost"
