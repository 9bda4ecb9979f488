/* task.h - fields of the current task, read at the running kernel's offsets (userspace takes
 * them from BTF: closewait_trace/kernel/kfields.py) so that no kernel header defines the layout.
 * Each reader compiles to "unknown" where userspace did not find its fields. */
#ifndef CW_TASK_H
#define CW_TASK_H

#define CW_PF_EXITING 0x00000004 /* include/linux/sched.h, unchanged since 2.6 */

/* The current task's exit code if it is exiting (do_exit sets exit_code before it closes the
 * task's files, and the last fput of a socket runs in that task), else -1: not exiting, or
 * not known on this kernel. */
static __always_inline s32 exiting_code(void)
{
#ifdef CW_HAVE_PROCESS_EXIT
    char *task = (char *)bpf_get_current_task();
    u32 flags = 0;
    s32 code = 0;
    if (bpf_probe_read_kernel(&flags, sizeof(flags), task + CW_OFF_TASK_FLAGS) ||
        !(flags & CW_PF_EXITING))
        return -1;
    if (bpf_probe_read_kernel(&code, sizeof(code), task + CW_OFF_TASK_EXIT_CODE))
        return -1;
    return code & 0xffff;
#else
    return -1;
#endif
}

#endif /* CW_TASK_H */
