"""Microbenchmarks of cnn_ext's kernels against torch's built-ins; run with `python -m benchmarks.run --help`."""
