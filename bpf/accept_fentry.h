/* accept_fentry.h - the fentry backend: fexit inet_csk_accept, fentry tcp_close and, where
 * BTF has it, fexit __sys_accept4. They attach themselves when BCC loads them. */
#ifndef CW_ACCEPT_FENTRY_H
#define CW_ACCEPT_FENTRY_H

#include "accept_kernel.h"

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
        note_accept(ctx, (u64)ret, bpf_ktime_get_ns());
    return 0;
}

#ifdef CW_HAVE_COMPLETE_HASHDANCE
/* inet_csk_complete_hashdance(sk, child, req, own_req), 4.4+. */
KFUNC_PROBE(inet_csk_complete_hashdance, void *sk, void *child, void *req, bool own_req)
{
    note_queued((u64)sk, (u64)child);
    return 0;
}
#endif

KFUNC_PROBE(tcp_close, void *sk, long timeout)
{
    note_close(ctx, (u64)sk, bpf_ktime_get_ns());
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

#endif /* CW_ACCEPT_FENTRY_H */
