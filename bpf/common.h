/* common.h - what every handler uses: the context of one state change, the configuration,
 * the user's filters, the counters and the ring buffer. */
#ifndef CW_COMMON_H
#define CW_COMMON_H

#define CW_AF_INET 2
#define CW_AF_INET6 10
#define CW_IPPROTO_TCP 6
#define CW_EAGAIN 11

/* The connection's addresses as the tracepoint gives them (BCC defines the tracepoint's
 * argument struct only at the probe itself, so helpers take this instead). */
struct cw_tuple {
    u16 family;
    u16 lport;
    u16 rport;
    u8 laddr[CW_ADDR_LEN];
    u8 raddr[CW_ADDR_LEN];
};

/* One state change of one socket, as the handlers see it. */
struct cw_ctx {
    void *pctx;  /* the program's context: bpf_perf_event_output needs it (CW_EVENTS_PERF) */
    struct cw_config *cfg;
    u64 sk;    /* the struct sock address */
    u64 now;   /* ns, CLOCK_MONOTONIC */
    int oldstate;
    int newstate;
    const void *saddr; /* the classic tracepoint's 16-byte address fields, read when needed */
    const void *daddr;
    struct cw_tuple t;
};

static __always_inline u16 sock_u16(u64 sk, u32 off)
{
    u16 v = 0;
    bpf_probe_read_kernel(&v, sizeof(v), (char *)sk + off);
    return v;
}

static __always_inline u16 be16_to_host(u16 v)
{
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    return __builtin_bswap16(v);
#else
    return v;
#endif
}

/* Addresses only where they are needed, always 16 bytes: IPv4 ones IPv4-mapped
 * (::ffff:a.b.c.d), as the classic tracepoint stores them in its v6 fields. */
#ifdef CW_HAVE_RAW_TRACEPOINT
static __always_inline void load_addr(u8 *dst, u64 sk, int family, u32 off4, u32 off6)
{
    if (family == CW_AF_INET6) {
        bpf_probe_read_kernel(dst, CW_ADDR_LEN, (char *)sk + off6);
        return;
    }
    dst[10] = 0xff;
    dst[11] = 0xff;
    bpf_probe_read_kernel(dst + 12, 4, (char *)sk + off4);
}

static __always_inline void load_addrs(struct cw_ctx *c)
{
    load_addr(c->t.laddr, c->sk, c->t.family, CW_OFF_SOCK_RCV_SADDR, CW_OFF_SOCK_V6_RCV_SADDR);
    load_addr(c->t.raddr, c->sk, c->t.family, CW_OFF_SOCK_DADDR, CW_OFF_SOCK_V6_DADDR);
}
#else
static __always_inline void load_addrs(struct cw_ctx *c)
{
    bpf_probe_read_kernel(c->t.laddr, CW_ADDR_LEN, c->saddr);
    bpf_probe_read_kernel(c->t.raddr, CW_ADDR_LEN, c->daddr);
}
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

/* The configuration, or NULL while userspace has not finished writing it: every program
 * starts with this and does nothing until then. */
static __always_inline struct cw_config *get_config(void)
{
    int zero = 0;
    struct cw_config *cfg = config.lookup(&zero);
    if (!cfg || !cfg->ready)
        return 0;
    return cfg;
}

/* Does a socket pass the user's -p/--port/--netns filters? An unknown owner passes the pid
 * filter: userspace resolves it from /proc and decides. */
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
    if (cfg->filter_netns) {
        u32 n = s->netns;
        if (!netns_filter.lookup(&n))
            return 0;
    }
    if (cfg->filter_pids && (s->flags & CW_F_OWNER_KNOWN)) {
        u32 t = s->owner_tgid;
        if (!pid_filter.lookup(&t))
            return 0;
    }
    return 1;
}

/* A record for userspace, or a lost one counted (CW_STAT_RINGBUF_LOST names the event
 * output, whichever buffer it is). pctx: the program's context (used by the perf buffer). */
#ifdef CW_EVENTS_PERF
static __always_inline struct cw_event *event_begin(void)
{
    int zero = 0;
    return event_scratch.lookup(&zero);
}

static __always_inline void event_end(void *pctx, struct cw_event *ev)
{
    /* A full perf buffer also reports the loss to userspace later (its lost callback);
     * userspace takes the larger of the two counts, so it is not counted twice. */
    if (events.perf_submit(pctx, ev, sizeof(*ev)) < 0)
        stat_inc(CW_STAT_RINGBUF_LOST);
}
#else
static __always_inline struct cw_event *event_begin(void)
{
    return events.ringbuf_reserve(sizeof(struct cw_event));
}

static __always_inline void event_end(void *pctx, struct cw_event *ev)
{
    events.ringbuf_submit(ev, 0);
}
#endif

static __always_inline void emit(void *pctx, u32 type, struct cw_sock *s, u64 now, int oldstate,
                                 int newstate, u32 how, u32 exit_code)
{
    struct cw_event *ev = event_begin();
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
    ev->exit_code = exit_code;
    bpf_get_current_comm(&ev->comm, sizeof(ev->comm));
    __builtin_memcpy(&ev->sock, s, sizeof(ev->sock));
    event_end(pctx, ev);
}

/* A state change of a socket under a timeline watch. */
static __always_inline void emit_state(struct cw_ctx *c, struct cw_sock *s)
{
    if (s->flags & CW_F_TIMELINE)
        emit(c->pctx, CW_EV_STATE, s, c->now, c->oldstate, c->newstate, CW_EXIT_NONE, 0);
}

#endif /* CW_COMMON_H */
