"""The floor for closewait-trace's kernel side, as a benchmark config (`floor`).

One BPF program on sock:inet_sock_set_state that only keeps a per-socket hash map: it
updates the socket's entry at every TCP state change and deletes it at CLOSE, and nothing
reaches userspace. Any tracer that follows sockets through this tracepoint does at least
this much, so its paired cost against `none` is what a per-socket design cannot go below.

With --raw, the same on the raw tracepoint (`raw_tp/inet_sock_set_state`: the program gets the
struct sock pointer and the states, and the kernel skips filling the tracepoint's record;
a real tracer would then have to read the addresses from struct sock itself). Config
`floor-raw` of the benchmark, not run by default: it measures what that would save.

With --cw-only (config `floor-cw`, with --raw), a hash-map CLOSE_WAIT timer reduced to its
core: one entry per stay, inserted when the peer's FIN arrives and looked up (for its entry
time) and deleted when the socket leaves CLOSE_WAIT; every other transition returns at once,
and the protocol is not checked. It bounds from below a hash-map design that keeps no
per-socket state until CLOSE_WAIT (issue 12): on a workload where every connection passes
through CLOSE_WAIT (the benchmark's client side does), it still pays one insert and one
delete per connection.

With --empty, the program returns at once (no map, no work): configs `empty` (tracepoint) and
`empty-raw` (--empty --raw) measure what merely attaching to the tracepoint costs, the limit
below every tracer on it.

Run by bench/overhead.py; alone: `sudo .venv/bin/python -m bench.floor` (Ctrl-C stops it).
It prints one JSON line {"type": "ready"} once attached, and {"type": "summary"} with the
number of program runs at exit.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from types import FrameType

from closewait_trace.kernel.attach import import_bcc
from closewait_trace.kernel.headers import candidate_header_dirs

# One body; only the entry point differs (CW_RAW selects the raw tracepoint).
PROGRAM = r"""
struct floor_value {
    u64 ts;
    u32 state;
    u32 pad;
};

BPF_HASH(floor_socks, u64, struct floor_value, 131072);

BPF_ARRAY(floor_cw_ns, u64, 1);

/* --cw-only: TCP_CLOSE_WAIT is 8; the time spent in it is summed, as a timer would. */
static __always_inline int floor_cw(u64 sk, int oldstate, int newstate)
{
    if (newstate == 8) {
        struct floor_value v = {};
        v.ts = bpf_ktime_get_ns();
        v.state = newstate;
        floor_socks.update(&sk, &v);
    } else if (oldstate == 8) {
        struct floor_value *v = floor_socks.lookup(&sk);
        int zero = 0;
        u64 *sum = floor_cw_ns.lookup(&zero);
        if (!v)
            return 0;
        if (sum)
            __sync_fetch_and_add(sum, bpf_ktime_get_ns() - v->ts);
        floor_socks.delete(&sk);
    }
    return 0;
}

static __always_inline int floor_keep(u64 sk, int newstate)
{
    if (newstate == 7) { /* TCP_CLOSE */
        floor_socks.delete(&sk);
        return 0;
    }
    struct floor_value v = {};
    v.ts = bpf_ktime_get_ns();
    v.state = newstate;
    floor_socks.update(&sk, &v);
    return 0;
}

#ifdef CW_RAW
RAW_TRACEPOINT_PROBE(inet_sock_set_state)
{
#if defined(CW_EMPTY)
    return 0;
#elif defined(CW_CW_ONLY)
    return floor_cw(ctx->args[0], (int)ctx->args[1], (int)ctx->args[2]);
#else
    /* args: (const struct sock *sk, int oldstate, int newstate); no protocol here. */
    return floor_keep(ctx->args[0], (int)ctx->args[2]);
#endif
}
#else
TRACEPOINT_PROBE(sock, inet_sock_set_state)
{
#if defined(CW_EMPTY)
    return 0;
#else
    if (args->protocol != 6)
        return 0;
#if defined(CW_CW_ONLY)
    return floor_cw((u64)args->skaddr, args->oldstate, args->newstate);
#else
    return floor_keep((u64)args->skaddr, args->newstate);
#endif
#endif
}
#endif
"""

_stop = False


def _on_signal(_signum: int, _frame: FrameType | None) -> None:
    global _stop
    _stop = True


def main() -> int:
    flags = {"--raw": "-DCW_RAW", "--empty": "-DCW_EMPTY", "--cw-only": "-DCW_CW_ONLY"}
    cflags = [flags[a] for a in sys.argv[1:] if a in flags]
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)
    bcc = import_bcc()
    errors: list[str] = []
    bpf = None
    for cand in candidate_header_dirs():
        os.environ["BCC_KERNEL_SOURCE"] = str(cand.path)
        try:
            bpf = bcc.BPF(text=PROGRAM.encode(), cflags=cflags)
            break
        except Exception as exc:  # BCC raises bare Exception
            errors.append(f"{cand.path}: {exc}")
    if bpf is None:
        print(f"floor: no header set compiles the program: {'; '.join(errors) or 'none found'}",
              file=sys.stderr)
        return 70
    print(json.dumps({"type": "ready"}), flush=True)
    while not _stop:
        time.sleep(0.2)
    entries = len(bpf[b"floor_socks"].items())
    print(json.dumps({"type": "summary", "entries_at_exit": entries}), flush=True)
    bpf.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
