"""VM matrix runner (virtme-ng) for real kernels; see runner.py."""
