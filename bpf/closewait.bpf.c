/* closewait.bpf.c - kernel side of closewait-trace (compiled by BCC): the entry points.
 *
 * Follows every TCP socket through sock:inet_sock_set_state and keeps what matters of it in
 * the socks map, keyed by its struct sock address. Userspace hears of a socket only when it
 * matters: it reads the cw map (sockets now in CLOSE_WAIT that passed the filters) every
 * tick, and gets a ring buffer event when a socket leaves CLOSE_WAIT after at least
 * report_min_ns. A healthy connection costs a few hash map operations and no event.
 *
 * Layout (in the manner of Inspektor Gadget's trace_tcp): this file holds only the entry
 * points; each concern lives in a small header beside it:
 *   maps.h          every map, with who inserts and who deletes
 *   common.h        the per-transition context, config, filters, counters, events
 *   task.h          fields of the current task, at offsets from the kernel's BTF
 *   netns.h         the network namespace of a socket and of the current task (BTF offsets)
 *   owner_room.h    room per owner (uid) in the cw map
 *   sockets.h       per-socket records: creation, accept, close, accept() outcomes
 *   accept_*.h      one per backend: how accept() and the application's close() are seen
 *   transitions.h   one handler per kind of state change, and the dispatcher
 *   follow.h        -p follows the processes a traced process starts (with CW_FOLLOW_PIDS)
 * BCC rewrites map operations only in the text it is given, so userspace (attach.py) inlines
 * these local headers into one text, with #line directives, before compiling.
 *
 * State changes come from the raw tracepoint where the socket fields it needs have offsets
 * (CW_HAVE_RAW_TRACEPOINT), else from the classic tracepoint, whose record has them.
 *
 * No kernel struct definition is used: the few fields read (task.h) are read at offsets
 * userspace takes from the running kernel's BTF, so the program compiles against any kernel's
 * headers and runs on any kernel that has the tracepoint (4.16+) and bpf_probe_read_kernel (5.5+);
 * events go through a BPF ring buffer (5.8+) or, with CW_EVENTS_PERF, a perf buffer (4.4+).
 *
 * Set at compile time with -D:
 *   CW_BACKEND        CW_BACKEND_KPROBE | CW_BACKEND_FENTRY | CW_BACKEND_TRACEPOINT
 *   CW_ACCEPT_NARGS   fentry only: parameters of inet_csk_accept in the kernel's BTF (4 or 2)
 *   CW_FOLLOW_PIDS    a pid filter is set: follow forks and exits
 *   CW_EVENTS_PERF    events through a perf buffer (kernels without ring buffers)
 *   CW_MAX_SOCKS, CW_MAX_CW, CW_MAX_LISTENERS, CW_MAX_PIDS, CW_RINGBUF_PAGES   map sizes
 *   CW_OFF_<FIELD>, CW_HAVE_<FEATURE>   kernel struct offsets and what they enable (kfields.py)
 * Everything else is set at run time through the config, pid_filter and port_filter maps.
 */
#include <uapi/linux/ptrace.h>
#include "closewait.h"
#include "maps.h"
#include "common.h"
#include "task.h"
#include "netns.h"
#include "owner_room.h"
#include "sockets.h"

#if CW_BACKEND == CW_BACKEND_TRACEPOINT
#include "accept_tracepoint.h"
#elif CW_BACKEND == CW_BACKEND_KPROBE
#include "accept_kprobe.h"
#elif CW_BACKEND == CW_BACKEND_FENTRY
#include "accept_fentry.h"
#else
#error "CW_BACKEND must be CW_BACKEND_TRACEPOINT, CW_BACKEND_KPROBE or CW_BACKEND_FENTRY"
#endif

#include "transitions.h"
#include "follow.h"

#ifdef CW_HAVE_RAW_TRACEPOINT
/* (struct sock *sk, int oldstate, int newstate): nothing is filled before the program runs;
 * it reads the protocol only for a transition it wants, the addresses only when needed. */
RAW_TRACEPOINT_PROBE(inet_sock_set_state)
{
    int oldstate = (int)ctx->args[1];
    int newstate = (int)ctx->args[2];
    struct cw_config *cfg = get_config();
    if (!cfg || !transition_wanted(cfg, oldstate, newstate))
        return 0;
    u64 sk = ctx->args[0];
    if (sock_u16(sk, CW_OFF_SOCK_PROTOCOL) != CW_IPPROTO_TCP)
        return 0;
    struct cw_ctx c = {};
    c.pctx = ctx;
    c.cfg = cfg;
    c.sk = sk;
    c.now = bpf_ktime_get_ns();
    c.oldstate = oldstate;
    c.newstate = newstate;
    c.t.family = sock_u16(sk, CW_OFF_SOCK_FAMILY);
    c.t.lport = be16_to_host(sock_u16(sk, CW_OFF_INET_SPORT));
    c.t.rport = be16_to_host(sock_u16(sk, CW_OFF_SOCK_DPORT));
    on_transition(&c);
    return 0;
}
#else
TRACEPOINT_PROBE(sock, inet_sock_set_state)
{
    if (args->protocol != CW_IPPROTO_TCP)
        return 0;
    struct cw_config *cfg = get_config();
    if (!cfg || !transition_wanted(cfg, args->oldstate, args->newstate))
        return 0;
    struct cw_ctx c = {};
    c.pctx = args;
    c.cfg = cfg;
    c.sk = (u64)args->skaddr;
    c.now = bpf_ktime_get_ns();
    c.oldstate = args->oldstate;
    c.newstate = args->newstate;
    c.saddr = args->saddr_v6;
    c.daddr = args->daddr_v6;
    c.t.family = args->family;
    c.t.lport = args->sport;
    c.t.rport = args->dport;
    on_transition(&c);
    return 0;
}
#endif

#ifdef CW_FOLLOW_PIDS
TRACEPOINT_PROBE(task, task_newtask)
{
    follow_new_task(args->pid, args->clone_flags);
    return 0;
}

TRACEPOINT_PROBE(sched, sched_process_exit)
{
    forget_exited_task();
    return 0;
}
#endif
