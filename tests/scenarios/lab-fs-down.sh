# holdfast lab when the outage takes the host file system down: the default guest's
# records on the lab's real ext4 host; the host device fails until the kernel says
# ext4 aborted its journal (at most 90 s), then works again while the file system
# stays down. The lab's operator detaches the disk, unmounts, e2fscks, mounts and
# attaches it, then conts (docs/durability.md). QEMU 10 beside it cannot let go of its
# image. Needs HOLDFAST, GUEST, WORK, QEMU (QEMU_DATA in the nested test host); root.
set -u -o pipefail
fail() { echo "SCENARIO FAIL lab-fs-down: $*"; exit 1; }
N=300
cat > "$WORK/down.json" <<JSON
{
  "name": "records-fs-down",
  "guest": {
    "kernel": "$GUEST/vmlinuz", "initrd": "$GUEST/initramfs.cpio.gz", "memory": "256M",
    "cmdline": "console=ttyS0 panic=-1 holdfast.workload=records holdfast.records=$N",
    "disks": [{"id": "data", "image": "$GUEST/disk.img"}]
  },
  "progress": {"ready": "GUEST WORKLOAD START", "ack": "ACK "},
  "outages": [{"kind": "fs-down", "when": {"line": "ACK 30"}, "lasts": "90s"}],
  "operator": {"cont_after": "2s", "tries": 3, "detach": true},
  "verify": {"boot": {"cmdline": "console=ttyS0 panic=-1 holdfast.workload=check-records",
                      "ok": "CHECK OK", "have": "HAVE ", "corrupt": "CORRUPT "}},
  "hosts": ["real"],
  "strategies": ["holdfast", "qemu"],
  "timeout": "10m"
}
JSON
export QEMU
"$HOLDFAST" lab --out "$WORK/lab" "$WORK/down.json" 2>&1 | tee "$WORK/lab.log"
status=$?
[ -f "$WORK/lab/results.md" ] || fail "no results.md (holdfast lab exited with $status)"
row() { grep "^| real | $1 | fs-down |" "$WORK/lab/results.md"; }
field() { echo "$1" | awk -F'|' -v f="$2" '{ gsub(/^ +| +$/, "", $f); print $f }'; }
hf=$(row holdfast) || fail "no holdfast row"
qf=$(row qemu) || fail "no qemu row"
echo "LAB holdfast: $hf"
echo "LAB qemu: $qf"
[ "$status" -eq 0 ] || fail "holdfast lab exited with $status"
grep -q "lab: host file system down: .*\(Aborting journal\|read-only\)" "$WORK/lab.log" || fail "the lab did not see the host ext4 go down"
[ "$(field "$hf" 5)" = yes ] || fail "holdfast did not resume after the repair"
[ "$(field "$hf" 7)" = "$N" ] && [ "$(field "$hf" 8)" = 0 ] && [ "$(field "$hf" 9)" = 0 ] \
    || fail "holdfast: $(field "$hf" 7) of $N acknowledged, $(field "$hf" 8) lost, $(field "$hf" 9) damaged"
[ "$(field "$hf" 10)" = "check ok" ] || fail "holdfast: the check: $(field "$hf" 10)"
grep -q '"event": "detach"' "$WORK/lab/results.json" && grep -q '"event": "attach"' "$WORK/lab/results.json" \
    || fail "the operator's detach and attach are not in the timeline"
dmsetup ls | grep -q holdfast-lab && fail "the lab left a dm device"
echo "SCENARIO OK lab-fs-down: the host ext4 went down; after detach, repair, attach holdfast resumed and kept all $N acknowledged records; QEMU: resumed $(field "$qf" 5), $(field "$qf" 7) acknowledged, $(field "$qf" 8) lost, check: $(field "$qf" 10)"
