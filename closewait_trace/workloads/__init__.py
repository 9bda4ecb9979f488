"""Workloads: real servers and clients in child processes, for `closewait-trace demo`, the
kernel tests and the benchmarks. Not part of the tracer: no tracer module imports this package
(only cli.py's `demo` command does).

- roles.py: the roles, each a small server or client run as
  `python -m closewait_trace.workloads ROLE ARGS...` (the mixed demo's, the scenarios', the
  kernel tests' configurable server, and the benchmarks' load roles);
- children.py: the parent's side: a role in a child process (`Child`), named children
  (`Children`), stopping them;
- scenarios.py: what `demo --scenario NAME` runs (and the mixed demo, `demo` alone), in
  which order, and what the tracer should find.
"""
