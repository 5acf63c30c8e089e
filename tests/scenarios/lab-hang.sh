# holdfast lab with hung host storage: the default guest's records, after record 40
# the storage under the host's page cache stops answering for 20 s, then answers
# again: on the simulated XFS host (write-back, fdatasync and uncached reads wait) and
# on the lab's real ext4 host (every I/O of the host device waits: a dm device
# suspended with --noflush, as a hard NFS mount or a lost iSCSI path). The scenario
# sets no hang_timeout: the guest waits with it, nothing fails, nothing may be lost.
# QEMU 10 beside it on the real host. Root.
set -u -o pipefail
NAME=lab-hang N=120
. "$(dirname "$0")/lab.lib"
lab_scenario '["simulated:xfs", "real"]' '["holdfast", "qemu"]' \
    '[{"kind": "hang", "when": {"line": "ACK 40"}, "lasts": "20s"}]' '{"cont_after": "2s", "tries": 3}'
lab_run
sf=$(row simulated:xfs holdfast hang) hf=$(row real holdfast hang) qf=$(row real qemu hang)
echo "LAB holdfast on simulated:xfs: $sf"
echo "LAB holdfast on real: $hf"
echo "LAB qemu: $qf"
[ "$status" -eq 0 ] || fail "holdfast lab exited with $status"
grep -q '"state": "hung"' "$WORK/lab/results.json" || fail "the host never hung"
kept_all "$sf"
kept_all "$hf"
# The hang must have met the guest's I/O: in each holdfast run the acknowledgements
# per second stop for most of the 20 s between the first and the last.
gaps=$(awk '/^      "host": "/ { split($0, q, "\""); host = q[4] }
    /^      "strategy": "/ { split($0, q, "\""); strategy = q[4] }
    /"acks_per_second"/ { on = 1; best = 0; zeros = 0; seen = 0; next }
    on && /\]/ { on = 0; print host, strategy, best + 0 }
    on { v = $1 + 0; if (v > 0) { if (seen && zeros > best) best = zeros; zeros = 0; seen = 1 } else if (seen) zeros++ }' \
    "$WORK/lab/results.json")
echo "LAB longest stretch without an acknowledgement (host, strategy, seconds):"
echo "$gaps" | sed 's/^/LAB   /'
for h in simulated:xfs real; do
    gap=$(echo "$gaps" | awk -v h="$h" '$1 == h && $2 == "holdfast" { print $3 }')
    [ "${gap:-0}" -ge 10 ] || fail "on $h the hang did not stop the guest's acknowledgements (longest gap ${gap:-none} s)"
done
nothing_left
echo "SCENARIO OK lab-hang: the host storage hung for 20 s after record 40; holdfast finished with all $N acknowledged records on simulated XFS and real ext4; QEMU: finished $(field "$qf" 5), $(field "$qf" 7) acknowledged, $(field "$qf" 8) lost"
