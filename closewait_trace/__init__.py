"""closewait-trace: an eBPF tracer that explains TCP sockets stuck in CLOSE_WAIT."""

__version__ = "0.1.0"
