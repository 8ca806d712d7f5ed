"""One prepared GPU session: tests, then benchmarks, each stage under its own timeout (run.sh)."""
