# holdfast lab with hung host storage: the default guest's records on the lab's real
# ext4 host; after record 40 every I/O of the host device waits for 20 s (a dm device
# suspended with --noflush: a hard NFS mount, a lost iSCSI path), then flows again.
# holdfast has no hang-timeout yet: the guest waits with it, nothing fails, nothing
# may be lost. QEMU 10 beside it. Needs HOLDFAST, GUEST, WORK, QEMU (QEMU_DATA in the
# nested test host); root.
set -u -o pipefail
fail() { echo "SCENARIO FAIL lab-hang: $*"; exit 1; }
N=120
cat > "$WORK/hang.json" <<JSON
{
  "name": "records-hang",
  "guest": {
    "kernel": "$GUEST/vmlinuz", "initrd": "$GUEST/initramfs.cpio.gz", "memory": "256M",
    "cmdline": "console=ttyS0 panic=-1 holdfast.workload=records holdfast.records=$N",
    "disks": [{"id": "data", "image": "$GUEST/disk.img"}]
  },
  "progress": {"ready": "GUEST WORKLOAD START", "ack": "ACK "},
  "outages": [{"kind": "hang", "when": {"line": "ACK 40"}, "lasts": "20s"}],
  "verify": {"boot": {"cmdline": "console=ttyS0 panic=-1 holdfast.workload=check-records",
                      "ok": "CHECK OK", "have": "HAVE ", "corrupt": "CORRUPT "}},
  "hosts": ["real"],
  "strategies": ["holdfast", "qemu"],
  "timeout": "10m"
}
JSON
export QEMU
"$HOLDFAST" lab --out "$WORK/lab" "$WORK/hang.json" 2>&1 | tee "$WORK/lab.log"
status=$?
[ -f "$WORK/lab/results.md" ] || fail "no results.md (holdfast lab exited with $status)"
row() { grep "^| real | $1 | hang |" "$WORK/lab/results.md"; }
field() { echo "$1" | awk -F'|' -v f="$2" '{ gsub(/^ +| +$/, "", $f); print $f }'; }
hf=$(row holdfast) || fail "no holdfast row"
qf=$(row qemu) || fail "no qemu row"
echo "LAB holdfast: $hf"
echo "LAB qemu: $qf"
[ "$status" -eq 0 ] || fail "holdfast lab exited with $status"
grep -q '"state": "hung"' "$WORK/lab/results.json" || fail "the host never hung"
[ "$(field "$hf" 5)" = yes ] && [ "$(field "$hf" 7)" = "$N" ] && [ "$(field "$hf" 8)" = 0 ] \
    && [ "$(field "$hf" 10)" = "check ok" ] || fail "holdfast: $hf"
# The hang must have met the guest's I/O: in holdfast's run (the first), the
# acknowledgements per second stop for most of the 20 s between the first and the last.
gap=$(awk '/"acks_per_second"/ { n++; on = (n == 1); next } on && /\]/ { on = 0 }
    on { v = $1 + 0; if (v > 0) { if (seen && zeros > best) best = zeros; zeros = 0; seen = 1 } else if (seen) zeros++ }
    END { print best + 0 }' "$WORK/lab/results.json")
echo "LAB longest stretch without an acknowledgement in holdfast's run: $gap s"
[ "$gap" -ge 10 ] || fail "the hang did not stop the guest's acknowledgements (longest gap $gap s)"
dmsetup ls | grep -q holdfast-lab && fail "the lab left a dm device"
echo "SCENARIO OK lab-hang: the host storage hung for 20 s after record 40; holdfast finished with all $N acknowledged records; QEMU: finished $(field "$qf" 5), $(field "$qf" 7) acknowledged, $(field "$qf" 8) lost"
