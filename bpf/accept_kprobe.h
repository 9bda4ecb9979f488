/* accept_kprobe.h - the kprobe backend. Attached by userspace (attach.py): kretprobe
 * inet_csk_accept, kprobe tcp_close, kprobe inet_csk_complete_hashdance and kretprobe
 * __sys_accept4 where they can be probed. */
#ifndef CW_ACCEPT_KPROBE_H
#define CW_ACCEPT_KPROBE_H

#include "accept_kernel.h"

int cwt_accept_ret(struct pt_regs *ctx)
{
    stat_inc(CW_STAT_ACCEPT_RET_RUNS);
    u64 sk = PT_REGS_RC(ctx);
    if (sk)
        note_accept(ctx, sk, bpf_ktime_get_ns());
    return 0;
}

int cwt_complete_hashdance(struct pt_regs *ctx)
{
    note_queued(PT_REGS_PARM1(ctx), PT_REGS_PARM2(ctx)); /* (listener, child, req, own_req) */
    return 0;
}

int cwt_tcp_close(struct pt_regs *ctx)
{
    note_close(ctx, PT_REGS_PARM1(ctx), bpf_ktime_get_ns());
    return 0;
}

/* kretprobe __sys_accept4 (accept and accept4 both end there): outcomes without the
 * global cost of the syscall tracepoints. */
int cwt_accept_syscall_ret(struct pt_regs *ctx)
{
    stat_inc(CW_STAT_ACCEPT_SYS_RUNS);
    note_accept_result((int)PT_REGS_RC(ctx), bpf_ktime_get_ns());
    return 0;
}

#endif /* CW_ACCEPT_KPROBE_H */
