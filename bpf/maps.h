/* maps.h - every map of the BPF programs, with who inserts an entry and who deletes it.
 * Included once, by closewait.bpf.c. */
#ifndef CW_MAPS_H
#define CW_MAPS_H

/* The sizes userspace chooses come with -D from kernel/attach.py (ProbeSettings.cflags),
 * which holds their defaults; the -p filter's size is fixed here. */
#if !defined(CW_MAX_SOCKS) || !defined(CW_MAX_CW) || !defined(CW_MAX_LISTENERS) || \
    !defined(CW_RINGBUF_PAGES)
#error "CW_MAX_SOCKS, CW_MAX_CW, CW_MAX_LISTENERS and CW_RINGBUF_PAGES come from kernel/attach.py"
#endif
#ifndef CW_MAX_PIDS
#define CW_MAX_PIDS 16384
#endif

/* Every TCP socket the tracer has seen created (or first seen in CLOSE_WAIT).
 * Inserted: LISTEN -> SYN_RECV (passive), CLOSE -> SYN_SENT (active), -> CLOSE_WAIT (unknown).
 * Deleted: -> CLOSE (the address is reused after free). */
BPF_HASH(socks, u64, struct cw_sock, CW_MAX_SOCKS);

/* Sockets now in CLOSE_WAIT that passed the filters: what userspace polls.
 * Inserted: -> CLOSE_WAIT, or at accept of a CLOSE_WAIT socket that passes only then.
 * Deleted: CLOSE_WAIT -> LAST_ACK / CLOSE. */
BPF_HASH(cw, u64, struct cw_sock, CW_MAX_CW);

/* Listening ports of each network namespace and the process that called listen(), seeded by
 * userspace at start (every namespace's listeners).
 * Inserted: -> LISTEN (process context). Deleted: LISTEN -> CLOSE of the same socket. */
BPF_HASH(listeners, struct cw_lkey, struct cw_listener, CW_MAX_LISTENERS);

/* Processes that pass -p: value CW_PID_USER or CW_PID_FOLLOWED.
 * Inserted: by userspace (the -p PIDs and their descendants, CW_PID_USER); with -p, at
 * task:task_newtask for a new process of a traced one (CW_PID_FOLLOWED).
 * Deleted: by userspace (its own entries, when not wanted any more); at sched_process_exit
 * of a followed process. */
BPF_HASH(pid_filter, u32, u8, CW_MAX_PIDS);
/* Ports that pass --port. Written by userspace only. */
BPF_HASH(port_filter, u16, u8, 4096);
/* Network namespaces (inodes) that pass --netns and --container. Written by userspace only. */
BPF_HASH(netns_filter, u32, u8, 1024);
BPF_ARRAY(config, struct cw_config, 1);

/* How many entries of the cw map each owner (the socket's uid) holds, so that one owner
 * flooding it with its own CLOSE_WAIT sockets cannot leave no room for the others' leaks.
 * Inserted/incremented: when a socket enters the cw map. Decremented at its exit from
 * CLOSE_WAIT; deleted at zero. */
BPF_HASH(cw_per_owner, u32, u32, 4096);

/* Counters: CW_STAT_* per CPU, CLOSE_WAIT durations in log2(us) buckets per CPU. */
BPF_PERCPU_ARRAY(stats, u64, CW_STAT_MAX);
BPF_PERCPU_ARRAY(cw_hist, u64, CW_HIST_BUCKETS);

/* accept()/accept4() outcomes per process and failures per errno.
 * Inserted at sys_exit_accept*, never deleted (bounded; a full map is counted in userspace). */
BPF_HASH(accept_stats, u32, struct cw_accept_stat, 4096);
BPF_HASH(accept_errs, struct cw_accept_err, u64, 1024);

#ifdef CW_EVENTS_PERF
/* Kernels without BPF ring buffers (before 5.8): a per-CPU perf buffer (Linux 4.4+). Its
 * size is chosen by userspace when it opens it; records are built in event_scratch (one per
 * CPU: struct cw_event is too large for the stack next to the callers' own). */
BPF_PERF_OUTPUT(events);
BPF_PERCPU_ARRAY(event_scratch, struct cw_event, 1);
#else
BPF_RINGBUF_OUTPUT(events, CW_RINGBUF_PAGES);
#endif

#endif /* CW_MAPS_H */
