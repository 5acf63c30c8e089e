# holdfast lab on the real host: the default guest's records workload on an ext4 host
# file system (default options) that the lab makes on a dm device over a loop device;
# the host device fails every I/O (dm error table) after record 40 for 3 s. holdfast,
# the imitation of QEMU's werror=stop (retry-flush) and QEMU 10 itself (default cache
# and cache=none) side by side; the check boots the guest again after the host file
# system was unmounted and mounted again (its page cache gone).
# Needs HOLDFAST, GUEST, WORK, QEMU (and QEMU_DATA in the nested test host); root.
set -u -o pipefail
fail() { echo "SCENARIO FAIL lab-real: $*"; exit 1; }
N=120
cat > "$WORK/real.json" <<JSON
{
  "name": "records-real",
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
  "hosts": ["real"],
  "strategies": ["holdfast", "retry-flush", "qemu", "qemu-cache-none"],
  "timeout": "10m"
}
JSON
export QEMU
"$HOLDFAST" lab --out "$WORK/lab" "$WORK/real.json" 2>&1 | tee "$WORK/lab.log"
status=$?
[ -f "$WORK/lab/results.md" ] || fail "no results.md (holdfast lab exited with $status)"
grep -q "lab: real host: ext4 (default options) on dm holdfast-lab-" "$WORK/lab.log" || fail "the lab did not say what it made"
row() { grep "^| real | $1 | flush-eio |" "$WORK/lab/results.md"; }
field() { echo "$1" | awk -F'|' -v f="$2" '{ gsub(/^ +| +$/, "", $f); print $f }'; }
for s in holdfast retry-flush qemu qemu-cache-none; do
    r=$(row "$s") || fail "no $s row"
    echo "LAB $s: $r"
done
[ "$status" -eq 0 ] || fail "holdfast lab exited with $status"
hf=$(row holdfast)
[ "$(field "$hf" 5)" = yes ] || fail "holdfast did not resume"
[ "$(field "$hf" 7)" = "$N" ] && [ "$(field "$hf" 8)" = 0 ] && [ "$(field "$hf" 9)" = 0 ] \
    || fail "holdfast: $(field "$hf" 7) of $N acknowledged, $(field "$hf" 8) lost, $(field "$hf" 9) damaged"
[ "$(field "$hf" 10)" = "check ok" ] || fail "holdfast: the check: $(field "$hf" 10)"
grep -q "cont failed" "$WORK/lab/results.json" || fail "no cont was refused: the outage never met a flush"
dmsetup ls | grep -q holdfast-lab && fail "the lab left a dm device: $(dmsetup ls | grep holdfast-lab)"
grep -q "$WORK/lab" /proc/mounts && fail "the lab left a mount"
echo "SCENARIO OK lab-real: holdfast kept all $N acknowledged records on real ext4; retry-flush: $(field "$(row retry-flush)" 8) lost, QEMU: $(field "$(row qemu)" 8) lost (resumed: $(field "$(row qemu)" 5)), QEMU cache=none: $(field "$(row qemu-cache-none)" 8) lost (resumed: $(field "$(row qemu-cache-none)" 5))"
