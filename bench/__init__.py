"""Benchmarks for closewait-trace (commands, not tests). See bench/README.md."""
