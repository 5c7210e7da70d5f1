"""cleanplate.benchmarks: quality and latency harnesses writing to benchmarks/results/."""
