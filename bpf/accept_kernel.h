/* accept_kernel.h - what the kprobe and fentry backends share: both see accept() where the
 * kernel returns the socket (inet_csk_accept) and the application's close (tcp_close), so
 * they need no accept matching on state changes. Included by accept_kprobe.h and
 * accept_fentry.h. */
#ifndef CW_ACCEPT_KERNEL_H
#define CW_ACCEPT_KERNEL_H

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
