/* closewait.bpf.c - kernel side of closewait-trace (compiled by BCC).
 *
 * Follows every TCP socket through sock:inet_sock_set_state and keeps what matters of it in
 * the socks map, keyed by its struct sock address. Userspace hears of a socket only when it
 * matters: it reads the cw map (sockets now in CLOSE_WAIT that passed the filters) every
 * tick, and gets a ring buffer event when a socket leaves CLOSE_WAIT after at least
 * report_min_ns. A healthy connection costs a few hash map operations and no event.
 *
 * No kernel struct field is read anywhere: the program compiles against any kernel's headers
 * and runs on any kernel that has the tracepoint (4.16+) and BPF ring buffers (5.8+).
 *
 * Set at compile time with -D:
 *   CW_BACKEND        CW_BACKEND_KPROBE | CW_BACKEND_FENTRY | CW_BACKEND_TRACEPOINT
 *   CW_ACCEPT_NARGS   fentry only: parameters of inet_csk_accept in the kernel's BTF (4 or 2)
 *   CW_MAX_SOCKS, CW_MAX_CW, CW_MAX_LISTENERS, CW_RINGBUF_PAGES   map sizes
 * Everything else is set at run time through the config, pid_filter and port_filter maps.
 */
#include <uapi/linux/ptrace.h>
#include "closewait.h"

#ifndef CW_BACKEND
#error "CW_BACKEND must be defined"
#endif
#ifndef CW_MAX_SOCKS
#define CW_MAX_SOCKS 131072
#endif
#ifndef CW_MAX_CW
#define CW_MAX_CW 32768
#endif
#ifndef CW_MAX_LISTENERS
#define CW_MAX_LISTENERS 4096
#endif
#ifndef CW_RINGBUF_PAGES
#define CW_RINGBUF_PAGES 64
#endif

#define CW_AF_INET 2
#define CW_AF_INET6 10
#define CW_IPPROTO_TCP 6
#define CW_EAGAIN 11

/* Every TCP socket the tracer has seen created (or first seen in CLOSE_WAIT).
 * Inserted: LISTEN -> SYN_RECV (passive), CLOSE -> SYN_SENT (active), -> CLOSE_WAIT (unknown).
 * Deleted: -> CLOSE (the address is reused after free). */
BPF_HASH(socks, u64, struct cw_sock, CW_MAX_SOCKS);

/* Sockets now in CLOSE_WAIT that passed the filters: what userspace polls.
 * Inserted: -> CLOSE_WAIT, or at accept of a CLOSE_WAIT socket that passes only then.
 * Deleted: CLOSE_WAIT -> LAST_ACK / CLOSE. */
BPF_HASH(cw, u64, struct cw_sock, CW_MAX_CW);

/* Listening ports and the process that called listen(), seeded by userspace at start.
 * Inserted: -> LISTEN (process context). Deleted: LISTEN -> CLOSE of the same socket. */
BPF_HASH(listeners, u16, struct cw_listener, CW_MAX_LISTENERS);

/* Filters, written by userspace only. */
BPF_HASH(pid_filter, u32, u8, 4096);
BPF_HASH(port_filter, u16, u8, 4096);
BPF_ARRAY(config, struct cw_config, 1);

/* Counters: CW_STAT_* per CPU, CLOSE_WAIT durations in log2(us) buckets per CPU. */
BPF_PERCPU_ARRAY(stats, u64, CW_STAT_MAX);
BPF_PERCPU_ARRAY(cw_hist, u64, CW_HIST_BUCKETS);

/* accept()/accept4() outcomes per process and failures per errno.
 * Inserted at sys_exit_accept*, never deleted (bounded; a full map is counted in userspace). */
BPF_HASH(accept_stats, u32, struct cw_accept_stat, 4096);
BPF_HASH(accept_errs, struct cw_accept_err, u64, 1024);

BPF_RINGBUF_OUTPUT(events, CW_RINGBUF_PAGES);

#if CW_BACKEND == CW_BACKEND_TRACEPOINT
/* The peer address of passive sockets that are established and not yet accepted, so that
 * the accept() syscall's sockaddr can be tied back to a socket.
 * Inserted: SYN_RECV -> ESTABLISHED. Deleted: when matched at accept, or at -> CLOSE. */
BPF_HASH(pending, struct cw_peer, u64, CW_MAX_SOCKS);
/* accept()'s sockaddr pointer between syscall entry and exit. Key: pid_tgid. */
BPF_HASH(accept_args, u64, u64, 10240);
#endif

static __always_inline void stat_add(int idx, u64 n)
{
    u64 *v = stats.lookup(&idx);
    if (v)
        *v += n;
}

static __always_inline void stat_inc(int idx)
{
    stat_add(idx, 1);
}

static __always_inline struct cw_config *get_config(void)
{
    int zero = 0;
    return config.lookup(&zero);
}

/* Does a socket pass the user's -p/--port filters? An unknown owner passes the pid filter:
 * userspace resolves it from /proc and decides. */
static __always_inline int passes(struct cw_config *cfg, struct cw_sock *s)
{
    if (cfg->filter_ports) {
        u16 p = s->lport;
        if (!port_filter.lookup(&p)) {
            p = s->rport;
            if (!port_filter.lookup(&p))
                return 0;
        }
    }
    if (cfg->filter_pids && (s->flags & CW_F_OWNER_KNOWN)) {
        u32 t = s->owner_tgid;
        if (!pid_filter.lookup(&t))
            return 0;
    }
    return 1;
}

static __always_inline void emit(u32 type, struct cw_sock *s, u64 now, int oldstate, int newstate,
                                 u32 how)
{
    struct cw_event *ev = events.ringbuf_reserve(sizeof(struct cw_event));
    if (!ev) {
        stat_inc(CW_STAT_RINGBUF_LOST);
        return;
    }
    u64 id = bpf_get_current_pid_tgid();
    ev->ts = now;
    ev->type = type;
    ev->tgid = id >> 32;
    ev->tid = (u32)id;
    ev->oldstate = oldstate;
    ev->newstate = newstate;
    ev->exit_how = how;
    bpf_get_current_comm(&ev->comm, sizeof(ev->comm));
    __builtin_memcpy(&ev->sock, s, sizeof(ev->sock));
    events.ringbuf_submit(ev, 0);
}

/* Push the socks entry of a CLOSE_WAIT socket to the cw map if userspace should see it. */
static __always_inline void sync_cw(struct cw_config *cfg, u64 sk, struct cw_sock *s)
{
    if (!(s->flags & CW_F_IN_CW))
        return;
    if (!(s->flags & CW_F_REPORTED)) {
        if (!passes(cfg, s))
            return;
        s->flags |= CW_F_REPORTED;
        stat_inc(CW_STAT_CW_REPORTED);
    }
    if (cw.update(&sk, s))
        stat_inc(CW_STAT_CW_FULL);
}

/* accept() returned this socket, in the accepting process's context. */
static __always_inline void note_accept(u64 sk, u64 now)
{
    struct cw_config *cfg = get_config();
    if (!cfg)
        return;
    struct cw_sock *s = socks.lookup(&sk);
    if (!s) {
        stat_inc(CW_STAT_ACCEPT_UNMATCHED);
        return;
    }
    u64 id = bpf_get_current_pid_tgid();
    s->flags |= CW_F_ACCEPTED | CW_F_OWNER_KNOWN;
    s->flags &= ~CW_F_PENDING;
    s->ts_accept = now;
    s->owner_tgid = id >> 32;
    bpf_get_current_comm(&s->owner_comm, sizeof(s->owner_comm));
    stat_inc(CW_STAT_ACCEPTS);
    if (s->flags & CW_F_IN_CW) {
        s->flags |= CW_F_ACCEPT_IN_CW;
        sync_cw(cfg, sk, s);
    }
    if (s->flags & CW_F_TIMELINE)
        emit(CW_EV_ACCEPT, s, now, 0, 0, CW_EXIT_NONE);
}

/* The application closed this socket (tcp_close), in its context. */
static __always_inline void note_close(u64 sk, u64 now)
{
    struct cw_config *cfg = get_config();
    if (!cfg)
        return;
    struct cw_sock *s = socks.lookup(&sk);
    if (!s || s->ts_close)
        return;
    s->ts_close = now;
    s->closer_tgid = bpf_get_current_pid_tgid() >> 32;
    s->flags |= CW_F_APP_CLOSED;
    if ((s->flags & CW_F_IN_CW) && (s->flags & CW_F_REPORTED))
        cw.update(&sk, s);
    if (s->flags & CW_F_TIMELINE)
        emit(CW_EV_APP_CLOSE, s, now, 0, 0, CW_EXIT_NONE);
}

/* The connection's addresses as the tracepoint gives them (BCC defines the tracepoint's
 * argument struct only at the probe itself, so helpers take this instead). */
struct cw_tuple {
    u16 family;
    u16 lport;
    u16 rport;
    u8 laddr[CW_ADDR_LEN];
    u8 raddr[CW_ADDR_LEN];
};

static __always_inline void fill_tuple(struct cw_sock *s, struct cw_tuple *t)
{
    s->family = t->family;
    s->lport = t->lport;
    s->rport = t->rport;
    __builtin_memcpy(s->laddr, t->laddr, CW_ADDR_LEN);
    __builtin_memcpy(s->raddr, t->raddr, CW_ADDR_LEN);
}

/* A new socket: passive child, active connect, or one that predates the tracer. Its
 * addresses are not known yet for every kernel (an active socket has no local port at
 * SYN_SENT; Debian's 6.1 and 6.12 copy a child's peer address after SYN_RECV): they are read
 * when they matter, at CLOSE_WAIT, or at ESTABLISHED for the accept match. Returns 0 if the
 * socket could not be tracked (map full, counted). */
static __always_inline int create_sock(struct cw_config *cfg, u64 sk, u64 now, u32 flags,
                                       struct cw_tuple *t)
{
    struct cw_sock s = {};
    s.skaddr = sk;
    s.ts_first = now;
    s.flags = flags;
    fill_tuple(&s, t);
    if (flags & CW_F_PASSIVE) {
        u16 lport = s.lport;
        struct cw_listener *l = listeners.lookup(&lport);
        if (l) {
            s.owner_tgid = l->tgid;
            __builtin_memcpy(s.owner_comm, l->comm, CW_COMM_LEN);
            s.flags |= CW_F_OWNER_KNOWN;
        }
    } else if (flags & CW_F_ACTIVE) {
        /* connect() runs in the connecting process's context. */
        s.owner_tgid = bpf_get_current_pid_tgid() >> 32;
        bpf_get_current_comm(&s.owner_comm, sizeof(s.owner_comm));
        s.flags |= CW_F_OWNER_KNOWN;
    }
    if (cfg->timeline_all && passes(cfg, &s))
        s.flags |= CW_F_TIMELINE;
    if (socks.update(&sk, &s)) {
        stat_inc(CW_STAT_SOCKS_FULL);
        return 0;
    }
    return 1;
}

#if CW_BACKEND == CW_BACKEND_TRACEPOINT
/* Make a passive, not yet accepted socket findable by the peer address accept() returns. */
static __always_inline void add_pending(u64 sk, struct cw_sock *s)
{
    struct cw_peer peer = {};
    __builtin_memcpy(peer.addr, s->raddr, CW_ADDR_LEN);
    peer.port = s->rport;
    if (pending.update(&peer, &sk)) {
        stat_inc(CW_STAT_PENDING_FULL);
        return;
    }
    s->flags |= CW_F_PENDING;
}
#endif

static __always_inline void on_listen(struct cw_config *cfg, u64 sk, u64 now, int oldstate,
                                      int newstate, struct cw_tuple *t)
{
    u16 lport = t->lport;
    struct cw_sock s = {};
    s.skaddr = sk;
    fill_tuple(&s, t);
    if (newstate == CW_TCP_LISTEN) {
        struct cw_listener l = {};
        u64 id = bpf_get_current_pid_tgid();
        l.skaddr = sk;
        l.tgid = id >> 32;
        bpf_get_current_comm(&l.comm, sizeof(l.comm));
        if (listeners.update(&lport, &l))
            stat_inc(CW_STAT_LISTEN_FULL);
        s.owner_tgid = l.tgid;
        s.flags = CW_F_OWNER_KNOWN;
        __builtin_memcpy(s.owner_comm, l.comm, CW_COMM_LEN);
        if (passes(cfg, &s))
            emit(CW_EV_LISTEN, &s, now, oldstate, newstate, CW_EXIT_NONE);
        return;
    }
    struct cw_listener *l = listeners.lookup(&lport);
    if (l && l->skaddr == sk) {
        s.owner_tgid = l->tgid;
        __builtin_memcpy(s.owner_comm, l->comm, CW_COMM_LEN);
        s.flags = CW_F_OWNER_KNOWN;
        listeners.delete(&lport);
    }
    if (passes(cfg, &s))
        emit(CW_EV_UNLISTEN, &s, now, oldstate, newstate, CW_EXIT_NONE);
}

/* How a socket left CLOSE_WAIT, from the new state and who is running. */
static __always_inline u32 exit_how(struct cw_sock *s, int newstate, u32 tgid)
{
    if (newstate == CW_TCP_LAST_ACK)
        return CW_EXIT_APP_CLOSE;
#if CW_BACKEND != CW_BACKEND_TRACEPOINT
    /* tcp_close ran for it just before: closed with unread data, so the kernel sent a RST. */
    if (s->flags & CW_F_APP_CLOSED)
        return CW_EXIT_APP_ABORT;
#endif
    if ((s->flags & CW_F_OWNER_KNOWN) && tgid == s->owner_tgid) {
        if (s->flags & (CW_F_ACCEPTED | CW_F_ACTIVE))
            return CW_EXIT_APP_ABORT;
        return CW_EXIT_LISTENER_CLOSED;
    }
    return CW_EXIT_RESET;
}

static __always_inline void on_cw_exit(struct cw_config *cfg, u64 sk, struct cw_sock *s, u64 now,
                                       int oldstate, int newstate)
{
    u64 dur = now - s->ts_cw_enter;
    int bucket = bpf_log2l(dur / 1000);
    if (bucket >= CW_HIST_BUCKETS)
        bucket = CW_HIST_BUCKETS - 1;
    u64 *h = cw_hist.lookup(&bucket);
    if (h)
        (*h)++;
    stat_add(CW_STAT_CW_NS_SUM, dur);
    stat_inc(CW_STAT_CW_LEFT);

    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    u32 how = exit_how(s, newstate, tgid);
    if (how == CW_EXIT_APP_CLOSE || how == CW_EXIT_APP_ABORT) {
        s->flags |= CW_F_APP_CLOSED;
        if (!s->ts_close)
            s->ts_close = now;
        if (!s->closer_tgid)
            s->closer_tgid = tgid;
    }
    s->flags &= ~CW_F_IN_CW;
    if (s->flags & CW_F_REPORTED) {
        cw.delete(&sk);
        if (dur >= cfg->report_min_ns || (s->flags & CW_F_TIMELINE))
            emit(CW_EV_CW_EXIT, s, now, oldstate, newstate, how);
        else
            stat_inc(CW_STAT_CW_SHORT);
    }
}

TRACEPOINT_PROBE(sock, inet_sock_set_state)
{
    if (args->protocol != CW_IPPROTO_TCP)
        return 0;
    int oldstate = args->oldstate;
    int newstate = args->newstate;
    struct cw_config *cfg = get_config();
    if (!cfg)
        return 0;
    /* Most transitions tell nothing about CLOSE_WAIT (FIN_WAIT1/2, CLOSING, TIME_WAIT,
     * LAST_ACK after an active close; ESTABLISHED unless accepts are being matched or
     * timelines kept): leave before any map operation. */
    if (!cfg->timeline_all) {
        int wanted = newstate == CW_TCP_SYN_SENT || newstate == CW_TCP_SYN_RECV ||
                     newstate == CW_TCP_CLOSE_WAIT || newstate == CW_TCP_CLOSE ||
                     newstate == CW_TCP_LISTEN || oldstate == CW_TCP_CLOSE_WAIT ||
                     oldstate == CW_TCP_LISTEN;
#if CW_BACKEND == CW_BACKEND_TRACEPOINT
        wanted = wanted || (newstate == CW_TCP_ESTABLISHED && cfg->accept_watch);
#endif
        if (!wanted)
            return 0;
    }
    u64 sk = (u64)args->skaddr;
    u64 now = bpf_ktime_get_ns();
    struct cw_sock *s;
    struct cw_tuple t = {};
    t.family = args->family;
    t.lport = args->sport;
    t.rport = args->dport;
    /* Addresses only where they are needed. The tracepoint stores IPv4 addresses
     * IPv4-mapped in the v6 fields as well. */
#define LOAD_ADDRS()                                                                 \
    do {                                                                             \
        bpf_probe_read_kernel(t.laddr, CW_ADDR_LEN, args->saddr_v6);                 \
        bpf_probe_read_kernel(t.raddr, CW_ADDR_LEN, args->daddr_v6);                 \
    } while (0)

    if (newstate == CW_TCP_LISTEN || oldstate == CW_TCP_LISTEN) {
        if (newstate == CW_TCP_SYN_RECV) {
            if (cfg->timeline_all) {
                LOAD_ADDRS();
                if (create_sock(cfg, sk, now, CW_F_PASSIVE, &t)) {
                    s = socks.lookup(&sk);
                    if (s && (s->flags & CW_F_TIMELINE))
                        emit(CW_EV_STATE, s, now, oldstate, newstate, CW_EXIT_NONE);
                }
                return 0;
            }
            create_sock(cfg, sk, now, CW_F_PASSIVE, &t);
            return 0;
        }
        LOAD_ADDRS();
        on_listen(cfg, sk, now, oldstate, newstate, &t);
        return 0;
    }
    if (newstate == CW_TCP_SYN_SENT) {
        if (cfg->timeline_all) {
            LOAD_ADDRS();
            if (create_sock(cfg, sk, now, CW_F_ACTIVE, &t)) {
                s = socks.lookup(&sk);
                if (s && (s->flags & CW_F_TIMELINE))
                    emit(CW_EV_STATE, s, now, oldstate, newstate, CW_EXIT_NONE);
            }
            return 0;
        }
        create_sock(cfg, sk, now, CW_F_ACTIVE, &t);
        return 0;
    }

    s = socks.lookup(&sk);
    if (newstate == CW_TCP_CLOSE_WAIT) {
        LOAD_ADDRS();
        if (!s) {
            if (!create_sock(cfg, sk, now, CW_F_PREEXISTING, &t))
                return 0;
            s = socks.lookup(&sk);
            if (!s)
                return 0;
        }
        s->ts_cw_enter = now;
        s->flags |= CW_F_IN_CW;
        fill_tuple(s, &t);
        stat_inc(CW_STAT_CW_ENTERED);
#if CW_BACKEND == CW_BACKEND_TRACEPOINT
        /* Established before the accept watch began: matchable from now on. */
        if (cfg->accept_watch && (s->flags & CW_F_PASSIVE) && !(s->flags & CW_F_ACCEPTED))
            add_pending(sk, s);
#endif
        sync_cw(cfg, sk, s);
    } else if (!s) {
        if (oldstate == CW_TCP_CLOSE_WAIT) {
            /* In CLOSE_WAIT since before the tracer started: userspace knows it from its
             * sock_diag snapshot and matches this exit by address. */
            struct cw_sock u = {};
            LOAD_ADDRS();
            u.skaddr = sk;
            u.flags = CW_F_PREEXISTING;
            fill_tuple(&u, &t);
            if (passes(cfg, &u))
                emit(CW_EV_CW_EXIT, &u, now, oldstate, newstate, exit_how(&u, newstate, 0));
        }
        return 0;
    } else if (oldstate == CW_TCP_CLOSE_WAIT) {
        on_cw_exit(cfg, sk, s, now, oldstate, newstate);
    } else if (newstate == CW_TCP_ESTABLISHED) {
        s->ts_established = now;
#if CW_BACKEND == CW_BACKEND_TRACEPOINT
        if (cfg->accept_watch && (s->flags & CW_F_PASSIVE) && !(s->flags & CW_F_ACCEPTED)) {
            LOAD_ADDRS();
            fill_tuple(s, &t);
            add_pending(sk, s);
        }
#endif
    }

    if (s->flags & CW_F_TIMELINE)
        emit(CW_EV_STATE, s, now, oldstate, newstate, CW_EXIT_NONE);

    if (newstate == CW_TCP_CLOSE) {
#if CW_BACKEND == CW_BACKEND_TRACEPOINT
        if (s->flags & CW_F_PENDING) {
            struct cw_peer peer = {};
            __builtin_memcpy(peer.addr, s->raddr, CW_ADDR_LEN);
            peer.port = s->rport;
            u64 *owner = pending.lookup(&peer);
            if (owner && *owner == sk)
                pending.delete(&peer);
        }
#endif
        socks.delete(&sk);
    }
    return 0;
}

/* accept() outcomes, for every backend: EMFILE and friends fail before inet_csk_accept runs. */
static __always_inline void note_accept_result(long ret, u64 now)
{
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    struct cw_accept_stat *st = accept_stats.lookup(&tgid);
    if (!st) {
        struct cw_accept_stat zero = {};
        accept_stats.update(&tgid, &zero);
        st = accept_stats.lookup(&tgid);
        if (!st)
            return;
    }
    if (ret >= 0) {
        st->ok++;
        st->last_ok_ts = now;
        return;
    }
    if (ret == -CW_EAGAIN)
        return;
    st->err++;
    st->last_err_ts = now;
    st->last_err = -ret;
    struct cw_accept_err key = {.tgid = tgid, .err = -ret};
    u64 one = 1;
    u64 *n = accept_errs.lookup(&key);
    if (n)
        (*n)++;
    else
        accept_errs.update(&key, &one);
}

/* accept() through the syscall tracepoints: the only way on kernels without kprobes and
 * fentry. Attaching any syscalls:* tracepoint puts every syscall of every thread on the
 * kernel's slower tracing path (measured here: about a fifth of a connection-per-request
 * server's rate), so userspace attaches these only while they are needed, and detaches
 * them after. The layouts are the syscall tracepoints' own (stable): common fields, the
 * syscall number, then the arguments or the return value, each 8 bytes. */
struct cw_sys_enter_accept {
    u64 common;
    s32 nr;
    s32 _pad;
    u64 fd;
    u64 upeer_sockaddr;
    u64 upeer_addrlen;
};

struct cw_sys_exit {
    u64 common;
    s32 nr;
    s32 _pad;
    s64 ret;
};

#if CW_BACKEND == CW_BACKEND_TRACEPOINT
/* Tie accept()'s returned peer address back to the pending socket. */
struct cw_sockaddr {
    u16 family;
    u16 port_be;
    u8 v4[4];
    u8 v6[16]; /* sockaddr_in6: after 4 bytes of flowinfo, i.e. v4[] is flowinfo there */
};

int cwt_sys_enter_accept(struct cw_sys_enter_accept *ctx)
{
    u64 upeer = ctx->upeer_sockaddr;
    if (!upeer)
        return 0;
    u64 id = bpf_get_current_pid_tgid();
    accept_args.update(&id, &upeer);
    return 0;
}

int cwt_sys_exit_accept(struct cw_sys_exit *ctx)
{
    long ret = ctx->ret;
    u64 now = bpf_ktime_get_ns();
    note_accept_result(ret, now);
    u64 id = bpf_get_current_pid_tgid();
    u64 *upeer = accept_args.lookup(&id);
    if (!upeer)
        return 0;
    u64 uaddr = *upeer;
    accept_args.delete(&id);
    if (ret < 0)
        return 0;

    struct cw_sockaddr sa = {};
    if (bpf_probe_read_user(&sa, sizeof(sa), (void *)uaddr))
        return 0;
    struct cw_peer peer = {};
    peer.port = (sa.port_be >> 8) | ((sa.port_be & 0xff) << 8);
    if (sa.family == CW_AF_INET) {
        peer.addr[10] = 0xff;
        peer.addr[11] = 0xff;
        __builtin_memcpy(&peer.addr[12], sa.v4, 4);
    } else if (sa.family == CW_AF_INET6) {
        __builtin_memcpy(peer.addr, sa.v6, CW_ADDR_LEN);
    } else {
        return 0; /* not an inet socket */
    }
    u64 *skp = pending.lookup(&peer);
    if (!skp) {
        stat_inc(CW_STAT_ACCEPT_UNMATCHED);
        return 0;
    }
    u64 sk = *skp;
    pending.delete(&peer);
    note_accept(sk, now);
    return 0;
}
#else
/* Fallback for kprobe/fentry kernels without __sys_accept4: accept outcomes only. */
int cwt_sys_exit_accept(struct cw_sys_exit *ctx)
{
    note_accept_result(ctx->ret, bpf_ktime_get_ns());
    return 0;
}
#endif

#if CW_BACKEND == CW_BACKEND_KPROBE
/* Attached by userspace: kretprobe inet_csk_accept, kprobe tcp_close. */
int cwt_accept_ret(struct pt_regs *ctx)
{
    u64 sk = PT_REGS_RC(ctx);
    if (sk)
        note_accept(sk, bpf_ktime_get_ns());
    return 0;
}

int cwt_tcp_close(struct pt_regs *ctx)
{
    note_close(PT_REGS_PARM1(ctx), bpf_ktime_get_ns());
    return 0;
}

/* kretprobe __sys_accept4 (accept and accept4 both end there): outcomes without the
 * global cost of the syscall tracepoints. */
int cwt_accept_syscall_ret(struct pt_regs *ctx)
{
    note_accept_result((int)PT_REGS_RC(ctx), bpf_ktime_get_ns());
    return 0;
}
#endif

#if CW_BACKEND == CW_BACKEND_FENTRY
#if CW_ACCEPT_NARGS == 4
/* Before 6.10: inet_csk_accept(sk, flags, err, kern). */
KRETFUNC_PROBE(inet_csk_accept, void *sk, int flags, int *err, bool kern, void *ret)
#elif CW_ACCEPT_NARGS == 2
/* 6.10 and later: inet_csk_accept(sk, struct proto_accept_arg *arg). */
KRETFUNC_PROBE(inet_csk_accept, void *sk, void *arg, void *ret)
#else
#error "CW_ACCEPT_NARGS must be 4 or 2"
#endif
{
    if (ret)
        note_accept((u64)ret, bpf_ktime_get_ns());
    return 0;
}

KFUNC_PROBE(tcp_close, void *sk, long timeout)
{
    note_close((u64)sk, bpf_ktime_get_ns());
    return 0;
}

#ifdef CW_HAVE_SYS_ACCEPT4
/* fexit __sys_accept4(fd, upeer_sockaddr, upeer_addrlen, flags): accept outcomes. */
KRETFUNC_PROBE(__sys_accept4, int fd, void *upeer, void *upeer_len, int flags, int ret)
{
    note_accept_result(ret, bpf_ktime_get_ns());
    return 0;
}
#endif
#endif
