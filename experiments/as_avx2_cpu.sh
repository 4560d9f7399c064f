#!/usr/bin/env bash
# Runs a command as on an AVX2-only CPU, as far as each library lets one switch AVX-512 off, on an AVX-512
# machine (docs/benchmarks.md: a stand-in for an AVX2-only CPU in the CPU speed comparisons):
#   XLA's generated code:  --xla_cpu_max_isa=AVX2
#   YNNPACK inside jaxlib: avx2_cpu/sitecustomize.py clears AVX-512 from its cpuinfo (jaxlib 0.10.2, Linux)
#   PyTorch:               ATEN_CPU_CAPABILITY=avx2, ONEDNN_MAX_CPU_ISA=AVX2, MKL_ENABLE_INSTRUCTIONS=AVX2
# What stays: glibc's own string functions, and the machine's caches, clocks and memory.
# Example, from the project root with its venv active:
#   experiments/as_avx2_cpu.sh ../shared/bench/compare-classifier-cpu 256 5
set -eu
here=$(cd "$(dirname "$0")" && pwd)
[ $# -gt 0 ] || { echo "usage: $0 COMMAND [ARGS...]" >&2; exit 2; }
export CIFARJAX_HIDE_AVX512=1 PYTHONPATH="$here/avx2_cpu${PYTHONPATH:+:$PYTHONPATH}"
export XLA_FLAGS="--xla_cpu_max_isa=AVX2${XLA_FLAGS:+ $XLA_FLAGS}"
export ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2
exec "$@"
