/* netns.h - the network namespace of a socket and of the current task: the inode number that
 * `readlink /proc/PID/ns/net` and `lsns -t net` show. Read at the running kernel's offsets
 * (closewait_trace/kernel/kfields.py, feature "netns"); where they are not known every reader gives 0,
 * the namespace-blind mode: one namespace for all, which userspace states. */
#ifndef CW_NETNS_H
#define CW_NETNS_H

#ifdef CW_HAVE_NETNS
static __always_inline u32 netns_of_net(char *net)
{
    u32 inum = 0;
    if (net)
        bpf_probe_read_kernel(&inum, sizeof(inum), net + CW_OFF_NET_INUM);
    return inum;
}
#endif

/* sk->__sk_common.skc_net.net->ns.inum */
static __always_inline u32 sock_netns(u64 sk)
{
#ifdef CW_HAVE_NETNS
    char *net = 0;
    bpf_probe_read_kernel(&net, sizeof(net), (char *)sk + CW_OFF_SOCK_NET);
    return netns_of_net(net);
#else
    return 0;
#endif
}

/* current->nsproxy->net_ns->ns.inum; 0 for a task whose nsproxy is gone (exiting). */
static __always_inline u32 task_netns(void)
{
#ifdef CW_HAVE_NETNS
    char *task = (char *)bpf_get_current_task();
    char *nsproxy = 0;
    char *net = 0;
    bpf_probe_read_kernel(&nsproxy, sizeof(nsproxy), task + CW_OFF_TASK_NSPROXY);
    if (!nsproxy)
        return 0;
    bpf_probe_read_kernel(&net, sizeof(net), nsproxy + CW_OFF_NSPROXY_NET);
    return netns_of_net(net);
#else
    return 0;
#endif
}

/* The listener map's key for a port of a namespace. */
static __always_inline struct cw_lkey listener_key(u32 netns, u16 port)
{
    struct cw_lkey k = {};
    k.netns = netns;
    k.port = port;
    return k;
}

#endif /* CW_NETNS_H */
