"""`make bench`: the performance measurements (python -m bench.run)."""
