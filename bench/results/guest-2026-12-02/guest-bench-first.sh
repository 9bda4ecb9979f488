#!/bin/bash
# Runs in the guest, in the repository directory (tests/vm/runner.py's cmd.sh):
#   bash guest-bench.sh RESULTS_DIR
# 1. bench.overhead none,empty,closewait with closewait forced to the kprobe backend
# 2. the same with the fentry backend
# 3. diagnostics of inet_csk_accept's kretprobe: a tracefs kretprobe on the same function
#    (default maxactive) beside closewait-trace --backend=kprobe under one more load run,
#    kprobe_profile before/after, and probe/link/fdinfo snapshots during that run.
R=$1
ROUNDS=${ROUNDS:-6}
DUR=${DUR:-10}
T=/sys/kernel/tracing
D=/sys/kernel/debug
PY=.venv/bin/python
log() { echo "[guest $(date -u +%T)] $*"; }
mountpoint -q $T || mount -t tracefs tracefs $T
mountpoint -q $D || mount -t debugfs debugfs $D
{ uname -a; uptime; nproc; grep -c ^processor /proc/cpuinfo; cat /sys/devices/system/cpu/possible; } > "$R/guest-info.txt"

rc=0
for b in kprobe fentry; do
  log "bench.overhead, closewait --backend=$b"
  $PY -m bench.overhead --rounds "$ROUNDS" --duration "$DUR" --warmup 3 --no-cold-start \
    --only none,empty,closewait --bpf-stats --closewait-arg=--backend=$b \
    -o "$R/overhead-$b.md" || rc=$?
  uptime
done

snapshot() {  # what the kernel says about the probes while closewait-trace runs
  local pid
  pid=$(pgrep -o -x closewait-trace || pgrep -o -f 'bin/closewait-trace --json')
  echo "=== $(date -u +%T) uptime: $(cut -d' ' -f1 /proc/uptime) tracer pid ${pid:-none}"
  echo "--- $T/kprobe_profile"; cat $T/kprobe_profile
  echo "--- $D/kprobes/list"; cat $D/kprobes/list
  echo "--- bpftool link show"; bpftool link show 2>&1
  echo "--- bpftool perf show"; bpftool perf show 2>&1
  if [ -n "$pid" ]; then
    echo "--- fdinfo of the tracer's bpf-prog fds"
    for fd in /proc/$pid/fd/*; do
      if [ "$(readlink "$fd")" = "anon_inode:bpf-prog" ]; then
        echo "fd ${fd##*/}: $(grep -E 'prog_id|run_time_ns|run_cnt|recursion_misses' /proc/$pid/fdinfo/${fd##*/} | tr '\n' ' ')"
      fi
    done
  fi
}

log "diagnostics: tracefs kretprobe r:cwtdiag/accept_ret inet_csk_accept (default maxactive)"
echo 'r:cwtdiag/accept_ret inet_csk_accept' >> $T/kprobe_events && echo 1 > $T/events/cwtdiag/accept_ret/enable
echo 0 > $T/tracing_on  # the probe still counts hits and misses; nothing is written to the ring
{ echo "=== before"; cat $T/kprobe_profile; } > "$R/kprobe-profile.txt"
( while sleep 6; do snapshot; done ) > "$R/probe-snapshots.txt" 2>&1 &
watcher=$!
$PY -m bench.overhead --rounds 1 --duration "$DUR" --warmup 3 --no-cold-start \
  --only none,closewait --bpf-stats --closewait-arg=--backend=kprobe \
  -o "$R/diag-kprobe.md" || rc=$?
kill "$watcher"
{ echo "=== after"; cat $T/kprobe_profile; } >> "$R/kprobe-profile.txt"
echo 0 > $T/events/cwtdiag/accept_ret/enable; echo '-:cwtdiag/accept_ret' >> $T/kprobe_events
echo 1 > $T/tracing_on
uptime
log "done, rc $rc"
exit $rc
