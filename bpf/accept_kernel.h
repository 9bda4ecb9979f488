/* accept_kernel.h - what the kprobe and fentry backends share: both see accept() where the
 * kernel returns the socket (inet_csk_accept) and the application's close (tcp_close), so
 * they need no accept matching on state changes. Included by accept_kprobe.h and
 * accept_fentry.h. */
#ifndef CW_ACCEPT_KERNEL_H
#define CW_ACCEPT_KERNEL_H

/* The inode of a socket's file (sk->sk_socket->file->f_inode->i_ino): how userspace finds a
 * listener in sock_diag and /proc. 0 where the offsets are not known. */
static __always_inline u64 sock_ino(u64 sk)
{
    u64 ino = 0;
#ifdef CW_HAVE_LISTENER_LINK
    char *p = 0;
    bpf_probe_read_kernel(&p, sizeof(p), (char *)sk + CW_OFF_SOCK_SOCKET);
    if (p)
        bpf_probe_read_kernel(&p, sizeof(p), p + CW_OFF_SOCKET_FILE);
    if (p)
        bpf_probe_read_kernel(&p, sizeof(p), p + CW_OFF_FILE_INODE);
    if (p)
        bpf_probe_read_kernel(&ino, sizeof(ino), p + CW_OFF_INODE_INO);
#endif
    return ino;
}

/* inet_csk_complete_hashdance(listener, child, req, own_req): the 3-way handshake completed
 * and the kernel puts the child on this listener's accept queue (inet_csk_reqsk_queue_add,
 * which the compiler may inline there); in a SO_REUSEPORT group, this names the very
 * listener. Children made from SYN cookies take another path: their listener stays a
 * candidate. */
static __always_inline void note_queued(u64 listener, u64 child)
{
    if (!get_config())
        return;
    struct cw_sock *s = socks.lookup(&child);
    if (s)
        s->listener_ino = sock_ino(listener);
}

/* --- the hooks transitions.h calls ---------------------------------------------------------- */

static __always_inline int backend_wants(struct cw_config *cfg, int oldstate, int newstate)
{
    return 0;
}

static __always_inline void backend_cw_enter(struct cw_ctx *c, struct cw_sock *s)
{
}

static __always_inline void backend_established(struct cw_ctx *c, struct cw_sock *s)
{
}

static __always_inline void backend_close(struct cw_sock *s)
{
}

/* tcp_close ran for it just before: closed with unread data, so the kernel sent a RST. */
static __always_inline int backend_app_closed(struct cw_sock *s)
{
    return s->flags & CW_F_APP_CLOSED;
}

/* Fallback for kernels without a probeable __sys_accept4: accept() outcomes only, through
 * the syscall tracepoints (attached by userspace). */
int cwt_sys_exit_accept(struct cw_sys_exit *ctx)
{
    note_accept_result(ctx->ret, bpf_ktime_get_ns());
    return 0;
}

#endif /* CW_ACCEPT_KERNEL_H */
