"""llamaswap's benchmark suite (``make bench``); results go to docs/benchmarks.md."""
