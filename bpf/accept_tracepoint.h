/* accept_tracepoint.h - the tracepoint backend: accept() seen through the syscall
 * tracepoints, the application's close() not seen at all (kernels without kprobes and fentry).
 *
 * Attaching any syscalls:* tracepoint puts every syscall of every thread on the kernel's
 * slower tracing path (measured here: about a fifth of a connection-per-request server's
 * rate), so userspace attaches these only while they are needed (config.accept_watch), and
 * detaches them after. The layouts are the syscall tracepoints' own (stable): common fields,
 * the syscall number, then the arguments or the return value, each 8 bytes. */
#ifndef CW_ACCEPT_TRACEPOINT_H
#define CW_ACCEPT_TRACEPOINT_H

/* The peer address of passive sockets that are established and not yet accepted, so that
 * the accept() syscall's sockaddr can be tied back to a socket.
 * Inserted: SYN_RECV -> ESTABLISHED, -> CLOSE_WAIT, and by userspace when the watch begins.
 * Deleted: when matched at accept, or at -> CLOSE; emptied by userspace when the watch ends. */
BPF_HASH(pending, struct cw_peer, u64, CW_MAX_SOCKS);
/* accept()'s sockaddr pointer between syscall entry and exit. Key: pid_tgid.
 * Inserted: sys_enter_accept*. Deleted: sys_exit_accept*. */
BPF_HASH(accept_args, u64, u64, 10240);

/* The pending map's key of a socket: its peer, in its namespace. */
static __always_inline struct cw_peer peer_of_sock(struct cw_sock *s)
{
    struct cw_peer peer = {};
    __builtin_memcpy(peer.addr, s->raddr, CW_ADDR_LEN);
    peer.port = s->rport;
    peer.netns = s->netns;
    return peer;
}

/* Make a passive, not yet accepted socket findable by the peer address accept() returns. */
static __always_inline void add_pending(u64 sk, struct cw_sock *s)
{
    struct cw_peer peer = peer_of_sock(s);
    if (pending.update(&peer, &sk)) {
        stat_inc(CW_STAT_PENDING_FULL);
        return;
    }
    s->flags |= CW_F_PENDING;
}

/* accept() grafts the socket it returns onto a struct socket (sock_graft); a socket still in
 * an accept queue has none (every child is cloned with none). Two queued sockets of one
 * namespace share a peer address when a client uses one port towards two listening ports,
 * and the pending map then holds the later of them: a match is taken only for a socket
 * accept() has grafted, and a grafted socket is never made pending. Not proven: that the
 * grafted socket is the one this accept() returned (another thread may have accepted it
 * meanwhile), which would need the new fd's file. `unknown` where the offset of sk_socket is
 * not known (then such a pair can be mismatched). */
static __always_inline int grafted(u64 sk, int unknown)
{
#ifdef CW_HAVE_LISTENER_LINK
    u64 sock = 0;
    bpf_probe_read_kernel(&sock, sizeof(sock), (char *)sk + CW_OFF_SOCK_SOCKET);
    return sock != 0;
#else
    return unknown;
#endif
}

static __always_inline int awaits_accept(struct cw_config *cfg, struct cw_sock *s)
{
    return cfg->accept_watch && (s->flags & CW_F_PASSIVE) && !(s->flags & CW_F_ACCEPTED);
}

/* --- the hooks transitions.h calls ---------------------------------------------------------- */

/* ESTABLISHED matters while accepts are being matched. */
static __always_inline int backend_wants(struct cw_config *cfg, int oldstate, int newstate)
{
    return newstate == CW_TCP_ESTABLISHED && cfg->accept_watch;
}

/* Established before the accept watch began: matchable from now on. */
static __always_inline void backend_cw_enter(struct cw_ctx *c, struct cw_sock *s)
{
    /* grafted: accepted while no watch (or a mismatched one) saw it; its entry would take
     * the key of a socket still queued with the same peer */
    if (awaits_accept(c->cfg, s) && !grafted(c->sk, 0))
        add_pending(c->sk, s);
}

static __always_inline void backend_established(struct cw_ctx *c, struct cw_sock *s)
{
    if (!awaits_accept(c->cfg, s))
        return;
    load_addrs(c);
    fill_tuple(s, &c->t);
    add_pending(c->sk, s);
}

static __always_inline void backend_close(struct cw_sock *s)
{
    if (!(s->flags & CW_F_PENDING))
        return;
    struct cw_peer peer = peer_of_sock(s);
    u64 *owner = pending.lookup(&peer);
    if (owner && *owner == s->skaddr)
        pending.delete(&peer);
}

/* The application's close() is not seen by this backend. */
static __always_inline int backend_app_closed(struct cw_sock *s)
{
    return 0;
}

/* --- accept() through the syscall tracepoints ----------------------------------------------- */

struct cw_sys_enter_accept {
    u64 common;
    s32 nr;
    s32 _pad;
    u64 fd;
    u64 upeer_sockaddr;
    u64 upeer_addrlen;
};

/* Tie accept()'s returned peer address back to the pending socket. */
struct cw_sockaddr {
    u16 family;
    u16 port_be;
    u8 v4[4];
    u8 v6[16]; /* sockaddr_in6: after 4 bytes of flowinfo, i.e. v4[] is flowinfo there */
};

/* The peer as the pending map keys it, from the sockaddr accept() filled in; 0 if not inet. */
static __always_inline int peer_of(struct cw_sockaddr *sa, struct cw_peer *peer)
{
    peer->port = (sa->port_be >> 8) | ((sa->port_be & 0xff) << 8);
    if (sa->family == CW_AF_INET) {
        peer->addr[10] = 0xff;
        peer->addr[11] = 0xff;
        __builtin_memcpy(&peer->addr[12], sa->v4, 4);
        return 1;
    }
    if (sa->family == CW_AF_INET6) {
        __builtin_memcpy(peer->addr, sa->v6, CW_ADDR_LEN);
        return 1;
    }
    return 0;
}

int cwt_sys_enter_accept(struct cw_sys_enter_accept *ctx)
{
    u64 upeer = ctx->upeer_sockaddr;
    if (!upeer || !get_config())
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
    struct cw_sockaddr sa = {};
    struct cw_peer peer = {};
    if (ret < 0 || bpf_probe_read_user(&sa, sizeof(sa), (void *)uaddr) || !peer_of(&sa, &peer))
        return 0;
    peer.netns = task_netns();
    u64 *skp = pending.lookup(&peer);
    if (!skp || !grafted(*skp, 1)) {
        stat_inc(CW_STAT_ACCEPT_UNMATCHED);
        return 0;
    }
    u64 sk = *skp;
    pending.delete(&peer);
    note_accept(ctx, sk, now);
    return 0;
}

#endif /* CW_ACCEPT_TRACEPOINT_H */
