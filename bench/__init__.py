"""Speed and memory benchmarks on synthetic scenes: python -m bench.run (docs/BENCHMARKS.md)."""
