"""`python -m closewait_trace.demo ROLE [ARGS...]`: the same as
`python -m closewait_trace.workloads ROLE [ARGS...]` (closewait_trace/workloads/roles.py), for
the scripts and tests that name this module. The demo itself is closewait_trace.workloads."""

import sys

if __name__ == "__main__":
    from .workloads.roles import main

    sys.exit(main(sys.argv[1:]))
