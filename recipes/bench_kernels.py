"""Benchmark of the tiled contrastive losses: time, memory, FLOP/s, the largest batch that fits,
and a side-by-side comparison with pytorch-metric-learning.

    python -m recipes.bench_kernels                                   # clip, default sizes
    python -m recipes.bench_kernels --sizes 32768 --backends blockwise,dense --dim 128
    python -m recipes.bench_kernels --loss all --sizes 4096 --backends blockwise
    python -m recipes.bench_kernels --compare pml --sizes 4096        # ours vs PML, same inputs
    python -m recipes.bench_kernels --static                          # sm_90 compile report only
    python -m recipes.bench_kernels --list-losses

The implementation is the package :mod:`recipes.bench` (see its docstring for the modules); this
module is the entry point only.
"""
from __future__ import annotations

from recipes.bench.cli import main

if __name__ == "__main__":
    main()
