# holdfast lab's power cut (issue 29's scenario in the test command): SQLite
# (synchronous=EXTRA, rollback journal) on ext4 in the default guest, one row per
# transaction a second, beside a file written with O_DIRECT and never synced
# (holdfast.noise: writes no flush covers, for the modes to choose from); once the
# 40th of those is done the machine stops dead, and 20 crash
# states are rebuilt from the disk's write log (four of each mode: none, all,
# prefix, subset, torn), each checked by booting the guest again (ext4 replays its
# journal, SQLite rolls back its hot journal, then PRAGMA integrity_check and every
# row). Every acknowledged row must be in every state. (synchronous=FULL is not
# enough: in DELETE mode its commit is the journal's unlink, which it does not sync;
# a power cut right after a commit rolls that commit back. docs/power-cuts.md.) Then:
# - one state again from the first run's folder (from_run), alone by its seed and
#   mode: the same crash state and the same verdict;
# - the unsafe control, synchronous=OFF: some state must lose acknowledged rows
#   (else the power cut is not testing, and the lab fails);
# - a power cut asked of QEMU is refused before anything boots, naming the field.
set -u -o pipefail
NAME=lab-power-cut N=300 STATES=20
. "$(dirname "$0")/lab.lib"

# $1: the name, $2 extra kernel options of the first boot, $3 the outage's extra keys.
power_cut_scenario() {
    cat > "$WORK/$1.json" <<JSON
{
  "name": "$1",
  "seed": 1,
  "guest": {
    "kernel": "$GUEST/vmlinuz", "initrd": "$GUEST/initramfs.cpio.gz", "memory": "256M",
    "cmdline": "console=ttyS0 panic=-1 quiet holdfast.workload=sqlite holdfast.records=$N $2",
    "disks": [{"id": "data", "image": "$GUEST/disk.img"}]
  },
  "progress": {"ready": "GUEST WORKLOAD START", "ack": "ACK "},
  "outages": [{"kind": "power-cut", "when": {"line": "NOISE", "nth": 40}$3}],
  "verify": {"boot": {"cmdline": "console=ttyS0 panic=-1 quiet holdfast.workload=check-sqlite",
                      "ok": "CHECK OK", "have": "HAVE ", "corrupt": "CORRUPT "}},
  "hosts": ["simulated:ext4-ordered"],
  "strategies": ["holdfast"],
  "timeout": "5m"
}
JSON
}
# The "Power cuts" table's row (| host | strategy | outage | states | recovered |
# losing | most lost | damaged | verdict |: fields 2 to 10).
cut_row() { grep "^| simulated:ext4-ordered | holdfast | 1. power-cut" "$1/results.md" || fail "no power-cut row in $1/results.md"; }

# --- the safe application
power_cut_scenario safe "holdfast.sqlite_sync=EXTRA holdfast.noise=64 holdfast.pace=1" ""
"$HOLDFAST" lab --out "$WORK/safe" --runs "$STATES" --seed 1 "$WORK/safe.json" 2>&1 | tee "$WORK/safe.log"
status=$?
[ -f "$WORK/safe/results.md" ] || fail "no results.md (holdfast lab exited with $status)"
r=$(cut_row "$WORK/safe")
echo "LAB power cuts: $r"
[ "$status" -eq 0 ] || fail "holdfast lab exited with $status"
[ "$(field "$r" 5)" = "$STATES" ] || fail "$(field "$r" 5) crash states, not $STATES"
[ "$(field "$r" 6)" = "$STATES" ] || fail "the check failed in $(( STATES - $(field "$r" 6) )) states: $r"
[ "$(field "$r" 7)" = 0 ] && [ "$(field "$r" 9)" = 0 ] || fail "acknowledged rows lost or damaged: $r"
acked=$(grep -c . "$WORK/safe/runs/simulated-ext4-ordered_holdfast_1-power-cut/acked.txt")
[ "$acked" -ge 3 ] || fail "only $acked rows acknowledged before the cut"
for m in none all prefix subset torn; do
    grep -q "^| simulated:ext4-ordered | holdfast | power-cut $m seed " "$WORK/safe/results.md" || fail "no state of mode $m"
done
# The cut met writes the last flush had not covered (else every mode is the same).
grep "state .*: data: all seed" "$WORK/safe.log" | grep -qv "after it 0 writes" \
    || fail "no write after the last flush in any state: the modes had nothing to choose"
ls "$WORK/safe/"*-state-20.svg > /dev/null || fail "no SVG per crash state"

# --- one state again, from the first run's log: the same state, the same verdict
pick=10
line=$(grep "^| simulated:ext4-ordered | holdfast | power-cut .* seed $pick |" "$WORK/safe/results.md")
mode=$(echo "$line" | sed 's/.*power-cut \([a-z]*\) seed.*/\1/')
power_cut_scenario again "holdfast.sqlite_sync=EXTRA holdfast.noise=64 holdfast.pace=1" ", \"modes\": [\"$mode\"], \"from_run\": \"$WORK/safe/runs/simulated-ext4-ordered_holdfast_1-power-cut\""
sed -i 's/"when": {"line": "NOISE", "nth": 40}, //' "$WORK/again.json"
"$HOLDFAST" lab --out "$WORK/again" --runs 1 --seed "$pick" "$WORK/again.json" > "$WORK/again.log" 2>&1 \
    || { cat "$WORK/again.log"; fail "holdfast lab from the first run's log exited $?"; }
first=$(grep "lab:   state $pick: data: " "$WORK/safe.log" | head -n 1 | sed 's/.*data: //')
second=$(grep "lab:   state 1: data: " "$WORK/again.log" | head -n 1 | sed 's/.*data: //')
[ -n "$first" ] && [ "$first" = "$second" ] || fail "seed $pick gave another state from the same log: '$first' then '$second'"
verdict1=$(echo "$line" | awk -F'|' '{ print $10 }' | sed 's/state [0-9]*: //')
verdict2=$(grep "^| simulated:ext4-ordered | holdfast | power-cut $mode seed $pick |" "$WORK/again/results.md" | awk -F'|' '{ print $10 }' | sed 's/state [0-9]*: //')
[ "$verdict1" = "$verdict2" ] || fail "seed $pick: verdict '$verdict1', then '$verdict2'"
echo "LAB seed $pick again from the log: $second; verdict:$verdict2"

# --- the unsafe control must lose
power_cut_scenario control "holdfast.sqlite_sync=OFF holdfast.noise=64 holdfast.pace=1" ", \"control\": true"
"$HOLDFAST" lab --out "$WORK/control" --runs 5 --seed 1 "$WORK/control.json" > "$WORK/control.log" 2>&1
status=$?
c=$(cut_row "$WORK/control")
echo "LAB control (synchronous=OFF): $c"
[ "$status" -eq 0 ] || { tail -n 20 "$WORK/control.log"; fail "the control's lab exited $status"; }
[ "$(field "$c" 7)" -gt 0 ] || fail "the control lost nothing: $c"

# --- refused before anything boots
sed 's/"strategies": \["holdfast"\]/"strategies": ["holdfast", "qemu"], "hosts": ["real"]/; s/"hosts": \["simulated:ext4-ordered"\],//' \
    "$WORK/safe.json" > "$WORK/qemu.json"
out=$("$HOLDFAST" lab --check "$WORK/qemu.json" 2>&1)
rc=$?
[ "$rc" -eq 2 ] && echo "$out" | grep -q "strategies\[1\].*power cut.*write" || fail "a power cut of QEMU: exit $rc, $out"
echo "SCENARIO OK $NAME: $STATES crash states of SQLite synchronous=EXTRA on ext4 kept all $acked acknowledged rows; seed $pick rebuilt from the log gave the same state and verdict; synchronous=OFF lost rows in $(field "$c" 7) of 5 states (at most $(field "$c" 8)); QEMU refused"
