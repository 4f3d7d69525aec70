"""The GPU check's pieces (run by benchmarks/gpu_check.sh; see docs/gpu-check.md)."""
