/* follow.h - `-p PID` means the process and what it starts: the kernel adds each new
 * process of a traced one to pid_filter when it is created, so that even a child's very first
 * socket is judged by the filter (userspace's /proc scan, once a second, came too late).
 * Compiled in only with a pid filter (CW_FOLLOW_PIDS): forks and exits cost nothing otherwise.
 *
 * pid_filter values: CW_PID_USER for the PIDs userspace writes (the -p PIDs and the
 * descendants it found at start), CW_PID_FOLLOWED for those added here. */
#ifndef CW_FOLLOW_H
#define CW_FOLLOW_H

#define CW_CLONE_THREAD 0x00010000 /* include/uapi/linux/sched.h */

/* task:task_newtask, in the parent's context: a new process (not a thread) of a traced
 * process is traced from now on. */
static __always_inline void follow_new_task(u32 pid, u64 clone_flags)
{
    struct cw_config *cfg = get_config();
    if (!cfg || !cfg->filter_pids || (clone_flags & CW_CLONE_THREAD))
        return;
    u32 parent = bpf_get_current_pid_tgid() >> 32;
    if (!pid_filter.lookup(&parent))
        return;
    u8 followed = CW_PID_FOLLOWED;
    if (pid_filter.insert(&pid, &followed) && !pid_filter.lookup(&pid))
        stat_inc(CW_STAT_PIDS_FULL);
}

/* sched:sched_process_exit, in the exiting thread: a followed process is forgotten when its
 * leader exits, so that its PID, once reused, does not pass the filter. */
static __always_inline void forget_exited_task(void)
{
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32;
    if ((u32)id != tgid)
        return;
    u8 *v = pid_filter.lookup(&tgid);
    if (v && *v == CW_PID_FOLLOWED)
        pid_filter.delete(&tgid);
}

#endif /* CW_FOLLOW_H */
