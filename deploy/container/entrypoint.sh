#!/bin/sh
# The image's entry point: name what is missing in one line, with the flag or mount that
# fixes it (exit 78), then run closewait-trace with the given arguments (default: agent).
set -eu
missing() { echo "closewait-trace: error: $1" >&2; exit 78; }
case "${1:-agent}" in agent|doctor)
  # PID 2 is the kernel's kthreadd only in the host's PID namespace.
  [ "$(cat /proc/2/comm 2>/dev/null)" = kthreadd ] || \
    missing "the container has its own PID namespace and sees no other process: run it with --pid host (Kubernetes: hostPID: true)"
  eff=$(sed -n 's/^CapEff:[[:space:]]*//p' /proc/self/status)
  has() { [ $(( (0x$eff >> $1) & 1 )) = 1 ]; }
  if ! { has 39 && has 38; } && ! has 21; then
    missing "missing capabilities: add --cap-add BPF --cap-add PERFMON --cap-add SYS_PTRACE (Kubernetes: securityContext.capabilities.add [BPF, PERFMON, SYS_PTRACE]); before Linux 5.8: SYS_ADMIN"
  fi
  if [ "$(sed -n 's/^Seccomp:[[:space:]]*//p' /proc/self/status)" = 2 ] && ! has 21; then
    echo "closewait-trace: notice: a seccomp filter is on and CAP_SYS_ADMIN is off: the runtimes' default profiles then refuse bpf() (Operation not permitted); run with --security-opt seccomp=unconfined (Kubernetes: seccompProfile: {type: Unconfined}) or a profile that allows bpf and perf_event_open" >&2
  fi
  has 19 || has 21 || \
    echo "closewait-trace: notice: no CAP_SYS_PTRACE: the descriptor holding a leaked socket will be unknown (--cap-add SYS_PTRACE)" >&2
  [ -d /sys/kernel/debug/tracing/events ] || \
    missing "no tracefs under /sys/kernel/debug: mount the host's (-v /sys/kernel/debug:/sys/kernel/debug:ro; Kubernetes: a hostPath volume)"
  mkdir -p /var/cache/closewait-trace 2>/dev/null && [ -w /var/cache/closewait-trace ] || \
    missing "/var/cache/closewait-trace is not writable (read-only root): mount a volume there (-v closewait-cache:/var/cache/closewait-trace; Kubernetes: an emptyDir)"
  t=$(mktemp 2>/dev/null) && rm -f "$t" || \
    missing "/tmp is not writable (read-only root): mount a tmpfs there (--tmpfs /tmp; Kubernetes: an emptyDir)"
esac
exec /usr/bin/closewait-trace "$@"
