#!/bin/bash
# In the guest: threads blocked in accept() beyond the kretprobe's maxactive.
R=$1
T=/sys/kernel/tracing
log() { echo "[guest $(date -u +%T)] $*"; }
mountpoint -q $T || mount -t tracefs tracefs $T
echo 'r:cwtdiag/accept_ret inet_csk_accept' >> $T/kprobe_events && echo 1 > $T/events/cwtdiag/accept_ret/enable
echo 0 > $T/tracing_on
cat /sys/devices/system/cpu/possible
.venv/bin/closewait-trace --json --backend=kprobe > "$R/blocking-cw.out" 2> "$R/blocking-cw.err" &
cw=$!
for i in $(seq 1 240); do grep -q '"type": "ready"' "$R/blocking-cw.out" && break; sleep 0.5; done
log "tracer ready after ~$((i / 2)) s"
for n in 8 20; do
  /usr/bin/python3 /tmp/guestcost-vm/blocking_accept.py "$n"
  echo "kprobe_profile after $n:"; cat $T/kprobe_profile
done
sleep 3
kill -TERM "$cw"; wait "$cw"; echo "tracer exit $?"
grep '"type": "summary"' "$R/blocking-cw.out" | python3 -c 'import json,sys; d=json.loads(sys.stdin.read()); print({k: d.get(k) for k in ("backend","accepts_seen","accepts_unmatched","events_lost","cw_entered","complete")})'
echo 0 > $T/events/cwtdiag/accept_ret/enable; echo '-:cwtdiag/accept_ret' >> $T/kprobe_events; echo 1 > $T/tracing_on
