/* closewait.h - the layout shared by the BPF programs and the Python decoder.
 *
 * Only fixed-width types, explicit padding and constants live here: the Python side
 * (closewait_trace/kernel/decode.py) builds its ctypes structs from this very file at import
 * (closewait_trace/kernel/cheader.py), so members may only be __u8, __u16, __u32, __u64, __s32 or
 * char, arrays of them sized by a number or a #define of this file, or a struct defined above;
 * anything else stops the tracer with BpfHeaderError. The CW_F_, CW_EV_, CW_EXIT_, CW_STAT_,
 * CW_TCP_ and CW_PID_ constants are checked against decode.py's enums at import.
 * The file is included by bpf/closewait.bpf.c and must not include anything itself.
 */
#ifndef CLOSEWAIT_H
#define CLOSEWAIT_H

#define CW_COMM_LEN 16
#define CW_ADDR_LEN 16

/* TCP states as the kernel numbers them (include/net/tcp_states.h). */
#define CW_TCP_ESTABLISHED 1
#define CW_TCP_SYN_SENT 2
#define CW_TCP_SYN_RECV 3
#define CW_TCP_FIN_WAIT1 4
#define CW_TCP_FIN_WAIT2 5
#define CW_TCP_TIME_WAIT 6
#define CW_TCP_CLOSE 7
#define CW_TCP_CLOSE_WAIT 8
#define CW_TCP_LAST_ACK 9
#define CW_TCP_LISTEN 10
#define CW_TCP_CLOSING 11
#define CW_TCP_NEW_SYN_RECV 12

/* Which mechanism sees accept() and the application's close(). */
#define CW_BACKEND_TRACEPOINT 1
#define CW_BACKEND_KPROBE 2
#define CW_BACKEND_FENTRY 3

/* struct cw_sock.flags */
#define CW_F_PASSIVE (1u << 0)      /* child of a listener (LISTEN -> SYN_RECV seen) */
#define CW_F_ACTIVE (1u << 1)       /* connect()ed from this host (CLOSE -> SYN_SENT seen) */
#define CW_F_ACCEPTED (1u << 2)     /* the application accept()ed it */
#define CW_F_APP_CLOSED (1u << 3)   /* the application closed it (tcp_close or close() path) */
#define CW_F_OWNER_KNOWN (1u << 4)  /* owner_tgid is meaningful */
#define CW_F_PREEXISTING (1u << 5)  /* first seen after its creation: history is partial */
#define CW_F_IN_CW (1u << 6)        /* currently in CLOSE_WAIT */
#define CW_F_ACCEPT_IN_CW (1u << 7) /* accepted only after the peer had closed */
#define CW_F_TIMELINE (1u << 8)     /* every transition of this socket is sent to userspace */
#define CW_F_REPORTED (1u << 9)     /* passed the filters when it entered CLOSE_WAIT */
#define CW_F_PENDING (1u << 10)     /* tracepoint backend: in the accept-matching map */

/* struct cw_event.type */
#define CW_EV_CW_EXIT 1    /* a socket left CLOSE_WAIT after at least report_min_ns */
#define CW_EV_LISTEN 2     /* a socket started listening (process context: owner known) */
#define CW_EV_UNLISTEN 3   /* a listening socket closed */
#define CW_EV_STATE 4      /* a state change of a socket under a timeline watch */
#define CW_EV_ACCEPT 5     /* accept() of a socket under a timeline watch */
#define CW_EV_APP_CLOSE 6  /* the application's close of a socket under a timeline watch */

/* struct cw_event.exit_how: how a socket left CLOSE_WAIT */
#define CW_EXIT_NONE 0
#define CW_EXIT_APP_CLOSE 1       /* CLOSE_WAIT -> LAST_ACK: the application closed (or shut down) */
#define CW_EXIT_APP_ABORT 2       /* CLOSE_WAIT -> CLOSE by the application (unread data: RST sent) */
#define CW_EXIT_RESET 3           /* CLOSE_WAIT -> CLOSE outside the owner: RST received, timeout */
#define CW_EXIT_LISTENER_CLOSED 4 /* never accepted, its listener was closed */
#define CW_EXIT_PROCESS_EXIT 5    /* closed because its holder's process ended (killed or exited):
                                   * cw_event.exit_code says how */

/* Indices of the per-CPU stats array. */
#define CW_STAT_RINGBUF_LOST 0  /* the event output (ring or perf buffer) was full: an event was lost */
#define CW_STAT_SOCKS_FULL 1    /* the per-socket map was full: a socket went untracked */
#define CW_STAT_CW_FULL 2       /* the CLOSE_WAIT map was full: a CLOSE_WAIT socket went unseen */
#define CW_STAT_LISTEN_FULL 3   /* the listener map was full */
#define CW_STAT_CW_ENTERED 4    /* sockets that entered CLOSE_WAIT (all, filtered or not) */
#define CW_STAT_CW_REPORTED 5   /* of those, sockets that passed the filters */
#define CW_STAT_CW_SHORT 6      /* reported sockets that left before report_min_ns */
#define CW_STAT_ACCEPTS 7       /* accepts matched to a tracked socket */
#define CW_STAT_ACCEPT_UNMATCHED 8 /* successful accepts the tracer could not tie to a socket */
#define CW_STAT_PENDING_FULL 9  /* tracepoint backend: the accept-matching map was full */
#define CW_STAT_CW_NS_SUM 10    /* total ns spent in CLOSE_WAIT by sockets that left it */
#define CW_STAT_CW_LEFT 11      /* sockets that left CLOSE_WAIT (the histogram's count) */
#define CW_STAT_CW_UNDECIDED 12 /* under a pid filter, sockets of an owner the kernel could not
                                 * know (created before the tracer): sent to userspace, which
                                 * decides from /proc; not counted in CW_STAT_CW_REPORTED */
#define CW_STAT_PIDS_FULL 13    /* pid_filter was full: a new process of a traced one went
                                 * unfollowed */
#define CW_STAT_OWNER_FULL 14   /* a CLOSE_WAIT socket went unseen: its owner (uid) had used
                                 * its room in the cw map (config.owner_room) */
#define CW_STAT_ACCEPT_RET_RUNS 15 /* kprobe backend: runs of the inet_csk_accept kretprobe's
                                    * program (userspace sets them against the probe's hits) */
#define CW_STAT_ACCEPT_SYS_RUNS 16 /* kprobe backend: runs of the __sys_accept4 kretprobe's */
#define CW_STAT_KERNEL_SKIPPED 17  /* written by userspace, never by the programs: runs the kernel
                                    * skipped (a program busy on that CPU, a kretprobe out of
                                    * room), from the kernel's own counts (kernel/attach.py) */
#define CW_STAT_MAX 18

/* pid_filter values: who put the PID there. */
#define CW_PID_USER 1     /* userspace: a -p PID, or a descendant found in /proc at start */
#define CW_PID_FOLLOWED 2 /* the kernel: created by a traced process (bpf/follow.h) */

/* Number of log2 buckets of the CLOSE_WAIT duration histogram (microseconds). */
#define CW_HIST_BUCKETS 40

/* config[0]: settings written by userspace. BCC attaches the programs when it loads them,
 * before any map is written: every program does nothing until ready is set, which userspace
 * does last, once the filters, this config and the seeds (listeners, pids) are in place. */
struct cw_config {
    __u64 report_min_ns; /* a socket leaving CLOSE_WAIT sooner is only counted */
    __u32 filter_pids;   /* non-zero: only owners in pid_filter */
    __u32 filter_ports;  /* non-zero: only local or remote ports in port_filter */
    __u32 timeline_all;  /* non-zero: every socket passing the filters gets a timeline */
    __u32 accept_watch;  /* tracepoint backend: the accept syscall tracepoints are attached */
    __u32 ready;         /* non-zero: everything above and the filter maps are written */
    __u32 owner_room;    /* most cw map entries one owner (uid) may hold; 0: no limit */
    __u32 filter_netns;  /* non-zero: only sockets of a network namespace in netns_filter */
    __u32 _pad;
};

/* What the kernel knows of one socket: the value of the socks and cw maps. */
struct cw_sock {
    __u64 skaddr;         /* the struct sock address (reused after free) */
    __u64 ts_first;       /* first transition the tracer saw (ns, CLOCK_MONOTONIC) */
    __u64 ts_established; /* entered ESTABLISHED, 0 if not seen */
    __u64 ts_cw_enter;    /* entered CLOSE_WAIT: the peer's FIN arrived */
    __u64 ts_accept;      /* accept() returned it, 0 if not seen */
    __u64 ts_close;       /* the application closed it, 0 if not seen */
    __u32 owner_tgid;     /* accepting, connecting, or listener-owning process */
    __u32 closer_tgid;    /* process that closed it */
    __u32 flags;          /* CW_F_* */
    __u16 family;         /* AF_INET or AF_INET6 */
    __u16 lport;          /* local port, host order */
    __u16 rport;          /* remote port, host order */
    __u16 _pad0;
    __u32 netns;          /* network namespace inode (0: not known; see bpf/netns.h) */
    __u8 laddr[CW_ADDR_LEN]; /* IPv6, or IPv4-mapped IPv6 */
    __u8 raddr[CW_ADDR_LEN];
    char owner_comm[CW_COMM_LEN];
    __u64 listener_ino;   /* kprobe/fentry: inode of the listener the kernel queued it on
                           * (inet_csk_complete_hashdance), 0 if not seen */
};

/* One event record (ring buffer, or perf buffer with CW_EVENTS_PERF). */
struct cw_event {
    __u64 ts;       /* when it happened (ns, CLOCK_MONOTONIC) */
    __u32 type;     /* CW_EV_* */
    __u32 tgid;     /* current process (meaningless in softirq context) */
    __u32 tid;
    __s32 oldstate;
    __s32 newstate;
    __u32 exit_how; /* CW_EXIT_* for CW_EV_CW_EXIT */
    __u32 exit_code; /* CW_EXIT_PROCESS_EXIT: the task's exit_code (signal = code & 0x7f,
                      * status = (code >> 8) & 0xff), else 0 */
    __u32 _pad;
    char comm[CW_COMM_LEN];
    struct cw_sock sock;
};

/* Key of the listener map: a port of a network namespace. */
struct cw_lkey {
    __u32 netns; /* 0 in the namespace-blind mode */
    __u16 port;  /* host order */
    __u16 _pad;
};

/* Value of the listener map: the socket that listens there and who called listen(). */
struct cw_listener {
    __u64 skaddr;
    __u32 tgid;
    __u32 _pad;
    char comm[CW_COMM_LEN];
};

/* Key of the tracepoint backend's accept-matching map: the peer as accept() reports it, in
 * the namespace of the socket (at insertion) and of the accepting task (at accept). */
struct cw_peer {
    __u8 addr[CW_ADDR_LEN];
    __u16 port; /* host order */
    __u16 _pad0;
    __u32 netns;
};

/* Value of the accept_stats map, one per process calling accept()/accept4(). */
struct cw_accept_stat {
    __u64 last_ok_ts;  /* last successful accept (ns, CLOCK_MONOTONIC) */
    __u64 last_err_ts; /* last failed accept */
    __u64 ok;          /* successful accepts */
    __u64 err;         /* failed accepts, EAGAIN excluded */
    __s32 last_err;    /* positive errno of the last failure, EAGAIN excluded */
    __u32 _pad;
};

/* Key of the accept error counters. */
struct cw_accept_err {
    __u32 tgid;
    __s32 err; /* positive errno */
};

#endif /* CLOSEWAIT_H */
