/* transitions.h - one handler per kind of TCP state change, and the dispatcher the
 * sock:inet_sock_set_state entry point calls. Backend differences go through the backend_*
 * hooks of the accept_*.h header included before this one. */
#ifndef CW_TRANSITIONS_H
#define CW_TRANSITIONS_H

/* Most transitions tell nothing about CLOSE_WAIT (FIN_WAIT1/2, CLOSING, TIME_WAIT, LAST_ACK
 * after an active close; ESTABLISHED unless accepts are being matched or timelines kept):
 * leave before any map operation. */
static __always_inline int transition_wanted(struct cw_config *cfg, int oldstate, int newstate)
{
    if (cfg->timeline_all)
        return 1;
    return newstate == CW_TCP_SYN_SENT || newstate == CW_TCP_SYN_RECV ||
           newstate == CW_TCP_CLOSE_WAIT || newstate == CW_TCP_CLOSE ||
           newstate == CW_TCP_LISTEN || oldstate == CW_TCP_CLOSE_WAIT ||
           oldstate == CW_TCP_LISTEN || backend_wants(cfg, oldstate, newstate);
}

/* LISTEN -> SYN_RECV (a passive child) or CLOSE -> SYN_SENT (connect()). */
static __always_inline void on_new_sock(struct cw_ctx *c, u32 flags)
{
    if (!c->cfg->timeline_all) {
        create_sock(c, flags);
        return;
    }
    load_addrs(c);
    if (!create_sock(c, flags))
        return;
    struct cw_sock *s = socks.lookup(&c->sk);
    if (s)
        emit_state(c, s);
}

/* -> LISTEN: listen() runs in the owner's context. */
static __always_inline void on_listen_start(struct cw_ctx *c, struct cw_sock *s)
{
    struct cw_lkey key = listener_key(s->netns, c->t.lport);
    struct cw_listener l = {};
    l.skaddr = c->sk;
    l.tgid = bpf_get_current_pid_tgid() >> 32;
    bpf_get_current_comm(&l.comm, sizeof(l.comm));
    if (listeners.update(&key, &l))
        stat_inc(CW_STAT_LISTEN_FULL);
    s->owner_tgid = l.tgid;
    s->flags = CW_F_OWNER_KNOWN;
    __builtin_memcpy(s->owner_comm, l.comm, CW_COMM_LEN);
}

/* LISTEN -> CLOSE: forget the listener if it is the one the map holds for its port. */
static __always_inline void on_listen_end(struct cw_ctx *c, struct cw_sock *s)
{
    struct cw_lkey key = listener_key(s->netns, c->t.lport);
    struct cw_listener *l = listeners.lookup(&key);
    if (l && l->skaddr == c->sk) {
        s->owner_tgid = l->tgid;
        __builtin_memcpy(s->owner_comm, l->comm, CW_COMM_LEN);
        s->flags = CW_F_OWNER_KNOWN;
        listeners.delete(&key);
    }
}

static __always_inline void on_listen(struct cw_ctx *c)
{
    struct cw_sock s = {};
    load_addrs(c);
    s.skaddr = c->sk;
    s.netns = sock_netns(c->sk);
    fill_tuple(&s, &c->t);
    u32 type = c->newstate == CW_TCP_LISTEN ? CW_EV_LISTEN : CW_EV_UNLISTEN;
    if (type == CW_EV_LISTEN)
        on_listen_start(c, &s);
    else
        on_listen_end(c, &s);
    if (passes(c->cfg, &s))
        emit(c->pctx, type, &s, c->now, c->oldstate, c->newstate, CW_EXIT_NONE, 0);
}

/* -> CLOSE_WAIT: the peer's FIN arrived (softirq: the current task is nobody's owner). */
static __always_inline struct cw_sock *on_cw_enter(struct cw_ctx *c, struct cw_sock *s)
{
    load_addrs(c);
    if (!s) {
        if (!create_sock(c, CW_F_PREEXISTING))
            return 0;
        s = socks.lookup(&c->sk);
        if (!s)
            return 0;
    }
    s->ts_cw_enter = c->now;
    s->flags |= CW_F_IN_CW;
    fill_tuple(s, &c->t);
    if (!s->netns)
        s->netns = sock_netns(c->sk);
    stat_inc(CW_STAT_CW_ENTERED);
    backend_cw_enter(c, s);
    sync_cw(c->cfg, c->sk, s);
    return s;
}

/* How a socket left CLOSE_WAIT, from the new state and who is running. */
static __always_inline u32 exit_how(struct cw_sock *s, int newstate, u32 tgid)
{
    if (newstate == CW_TCP_LAST_ACK)
        return CW_EXIT_APP_CLOSE;
    if (backend_app_closed(s))
        return CW_EXIT_APP_ABORT;
    if ((s->flags & CW_F_OWNER_KNOWN) && tgid == s->owner_tgid) {
        if (s->flags & (CW_F_ACCEPTED | CW_F_ACTIVE))
            return CW_EXIT_APP_ABORT;
        return CW_EXIT_LISTENER_CLOSED;
    }
    return CW_EXIT_RESET;
}

/* exit_how, told apart from a close() of the application when the close ran because the
 * holder's process is ending: then *code is its exit code. */
static __always_inline u32 classify_exit(struct cw_sock *s, int newstate, u32 tgid, u32 *code)
{
    u32 how = exit_how(s, newstate, tgid);
    if (how != CW_EXIT_APP_CLOSE && how != CW_EXIT_APP_ABORT)
        return how;
    s32 exit_code = exiting_code();
    if (exit_code < 0)
        return how;
    *code = exit_code;
    return CW_EXIT_PROCESS_EXIT;
}

/* Left CLOSE_WAIT, in CLOSE_WAIT since before the tracer started: userspace knows it from
 * its sock_diag snapshot and matches this exit by address. */
static __always_inline void on_untracked_cw_exit(struct cw_ctx *c)
{
    struct cw_sock u = {};
    load_addrs(c);
    u.skaddr = c->sk;
    u.netns = sock_netns(c->sk);
    u.flags = CW_F_PREEXISTING;
    fill_tuple(&u, &c->t);
    if (!passes(c->cfg, &u))
        return;
    u32 code = 0;
    u32 how = classify_exit(&u, c->newstate, 0, &code);
    emit(c->pctx, CW_EV_CW_EXIT, &u, c->now, c->oldstate, c->newstate, how, code);
}

static __always_inline void count_cw_duration(u64 dur)
{
    int bucket = bpf_log2l(dur / 1000);
    if (bucket >= CW_HIST_BUCKETS)
        bucket = CW_HIST_BUCKETS - 1;
    u64 *h = cw_hist.lookup(&bucket);
    if (h)
        (*h)++;
    stat_add(CW_STAT_CW_NS_SUM, dur);
    stat_inc(CW_STAT_CW_LEFT);
}

/* CLOSE_WAIT -> LAST_ACK or CLOSE of a socket the tracer knows. */
static __always_inline void on_cw_exit(struct cw_ctx *c, struct cw_sock *s)
{
    u64 dur = c->now - s->ts_cw_enter;
    count_cw_duration(dur);
    u32 tgid = bpf_get_current_pid_tgid() >> 32;
    u32 code = 0;
    u32 how = classify_exit(s, c->newstate, tgid, &code);
    if (how != CW_EXIT_RESET && how != CW_EXIT_LISTENER_CLOSED) {
        s->flags |= CW_F_APP_CLOSED;
        if (!s->ts_close)
            s->ts_close = c->now;
        if (!s->closer_tgid)
            s->closer_tgid = tgid;
    }
    s->flags &= ~CW_F_IN_CW;
    if (!(s->flags & CW_F_REPORTED))
        return;
    cw.delete(&c->sk);
    give_room(c->cfg, c->sk);
    if (dur >= c->cfg->report_min_ns || (s->flags & CW_F_TIMELINE))
        emit(c->pctx, CW_EV_CW_EXIT, s, c->now, c->oldstate, c->newstate, how, code);
    else
        stat_inc(CW_STAT_CW_SHORT);
}

/* A change of a socket in the socks map (or entering CLOSE_WAIT); NULL if it is untracked. */
static __always_inline struct cw_sock *on_tracked(struct cw_ctx *c)
{
    struct cw_sock *s = socks.lookup(&c->sk);
    if (c->newstate == CW_TCP_CLOSE_WAIT)
        return on_cw_enter(c, s);
    if (!s) {
        if (c->oldstate == CW_TCP_CLOSE_WAIT)
            on_untracked_cw_exit(c);
        return 0;
    }
    if (c->oldstate == CW_TCP_CLOSE_WAIT) {
        /* Not marked in CLOSE_WAIT: the kernel skipped the run of its entry (counted in
         * userspace as a skipped run); no stay to time, userspace matches it by address. */
        if (s->flags & CW_F_IN_CW)
            on_cw_exit(c, s);
        else
            on_untracked_cw_exit(c);
    } else if (c->newstate == CW_TCP_ESTABLISHED) {
        s->ts_established = c->now;
        backend_established(c, s);
    }
    return s;
}

static __always_inline void on_transition(struct cw_ctx *c)
{
    if (c->newstate == CW_TCP_LISTEN || c->oldstate == CW_TCP_LISTEN) {
        if (c->newstate == CW_TCP_SYN_RECV)
            on_new_sock(c, CW_F_PASSIVE);
        else
            on_listen(c);
        return;
    }
    if (c->newstate == CW_TCP_SYN_SENT) {
        on_new_sock(c, CW_F_ACTIVE);
        return;
    }
    struct cw_sock *s = on_tracked(c);
    if (!s)
        return;
    emit_state(c, s);
    if (c->newstate == CW_TCP_CLOSE) {
        backend_close(s);
        socks.delete(&c->sk);
    }
}

#endif /* CW_TRANSITIONS_H */
