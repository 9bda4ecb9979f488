/* sockets.h - the per-socket record: in the cw map, created, accepted, closed by the
 * application; and accept() outcomes per process. Shared by every backend. */
#ifndef CW_SOCKETS_H
#define CW_SOCKETS_H

/* Push the socks entry of a CLOSE_WAIT socket to the cw map if userspace should see it. */
static __always_inline void sync_cw(struct cw_config *cfg, u64 sk, struct cw_sock *s)
{
    if (!(s->flags & CW_F_IN_CW))
        return;
    if (!(s->flags & CW_F_REPORTED)) {
        if (!passes(cfg, s) || !take_room(cfg, sk))
            return;
        s->flags |= CW_F_REPORTED;
        if (cfg->filter_pids && !(s->flags & CW_F_OWNER_KNOWN))
            stat_inc(CW_STAT_CW_UNDECIDED);
        else
            stat_inc(CW_STAT_CW_REPORTED);
    }
    if (cw.update(&sk, s))
        stat_inc(CW_STAT_CW_FULL);
}

static __always_inline void fill_tuple(struct cw_sock *s, struct cw_tuple *t)
{
    s->family = t->family;
    s->lport = t->lport;
    s->rport = t->rport;
    __builtin_memcpy(s->laddr, t->laddr, CW_ADDR_LEN);
    __builtin_memcpy(s->raddr, t->raddr, CW_ADDR_LEN);
}

/* The owner of a new socket: a passive child belongs to its listener's process, and so does
 * a socket first seen in CLOSE_WAIT on a listening port (created before the programs acted);
 * connect() runs in the connecting process's context. */
static __always_inline void set_new_owner(struct cw_sock *s, u32 flags)
{
    if (flags & (CW_F_PASSIVE | CW_F_PREEXISTING)) {
        struct cw_lkey key = listener_key(s->netns, s->lport);
        struct cw_listener *l = listeners.lookup(&key);
        if (l) {
            s->owner_tgid = l->tgid;
            __builtin_memcpy(s->owner_comm, l->comm, CW_COMM_LEN);
            s->flags |= CW_F_OWNER_KNOWN;
        }
    } else if (flags & CW_F_ACTIVE) {
        s->owner_tgid = bpf_get_current_pid_tgid() >> 32;
        bpf_get_current_comm(&s->owner_comm, sizeof(s->owner_comm));
        s->flags |= CW_F_OWNER_KNOWN;
    }
}

/* A new socket: passive child, active connect, or one that predates the tracer. Its
 * addresses are not known yet for every kernel (an active socket has no local port at
 * SYN_SENT; Debian's 6.1 and 6.12 copy a child's peer address after SYN_RECV): they are read
 * when they matter, at CLOSE_WAIT, or at ESTABLISHED for the accept match. So is the
 * namespace of an active socket (at CLOSE_WAIT); a passive one needs it now, for its
 * listener, and so does any socket the filters judge now. Returns 0 if the socket could not
 * be tracked (map full, counted). */
static __always_inline int create_sock(struct cw_ctx *c, u32 flags)
{
    struct cw_sock s = {};
    s.skaddr = c->sk;
    s.ts_first = c->now;
    s.flags = flags;
    fill_tuple(&s, &c->t);
    if ((flags & (CW_F_PASSIVE | CW_F_PREEXISTING)) || c->cfg->timeline_all)
        s.netns = sock_netns(c->sk);
    set_new_owner(&s, flags);
    if (c->cfg->timeline_all && passes(c->cfg, &s))
        s.flags |= CW_F_TIMELINE;
    if (socks.update(&c->sk, &s)) {
        stat_inc(CW_STAT_SOCKS_FULL);
        return 0;
    }
    return 1;
}

/* accept() returned this socket, in the accepting process's context. */
static __always_inline void note_accept(void *pctx, u64 sk, u64 now)
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
        /* The FIN may be handled on another CPU between our timestamp and this
         * check: accepted after it only if it came first by the clock. */
        if (s->ts_cw_enter <= now)
            s->flags |= CW_F_ACCEPT_IN_CW;
        sync_cw(cfg, sk, s);
    }
    if (s->flags & CW_F_TIMELINE)
        emit(pctx, CW_EV_ACCEPT, s, now, 0, 0, CW_EXIT_NONE, 0);
}

/* The application closed this socket (tcp_close), in its context. */
static __always_inline void note_close(void *pctx, u64 sk, u64 now)
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
        emit(pctx, CW_EV_APP_CLOSE, s, now, 0, 0, CW_EXIT_NONE, 0);
}

/* The layout of a syscalls:sys_exit_* tracepoint (stable): common fields, the syscall
 * number, the return value. */
struct cw_sys_exit {
    u64 common;
    s32 nr;
    s32 _pad;
    s64 ret;
};

static __always_inline void count_accept_err(u32 tgid, long ret)
{
    struct cw_accept_err key = {.tgid = tgid, .err = -ret};
    u64 one = 1;
    u64 *n = accept_errs.lookup(&key);
    if (n)
        (*n)++;
    else
        accept_errs.update(&key, &one);
}

/* accept() outcomes, for every backend: EMFILE and friends fail before inet_csk_accept runs. */
static __always_inline void note_accept_result(long ret, u64 now)
{
    if (!get_config())
        return;
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
    count_accept_err(tgid, ret);
}

#endif /* CW_SOCKETS_H */
