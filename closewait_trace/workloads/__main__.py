"""`python -m closewait_trace.workloads ROLE [ARGS...]`: run one role (see roles.py)."""

import sys

from .roles import main

sys.exit(main(sys.argv[1:]))
