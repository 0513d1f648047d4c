"""The kernel benchmark, one reason to change per module.

==============  ===========================================================================
``config``      the run's configuration (a dataclass) and shared constants
``cases``       what is measured: one entry per loss (inputs, call, FLOPs, PML counterpart)
``gate``        correctness before timing: backends vs float64, ours vs the peer's loss
``harness``     one measurement in a child process: time, peak memory, budgets, kill
``search``      which sizes run: predictions, memory/time guards, largest N that fits
``compare``     side-by-side runs against pytorch-metric-learning, ours/theirs ratios
``report``      tables, JSON, tagged CSV, PNG plots, the static sm_90 report
``cli``         flags, their validation, and the order of the steps
==============  ===========================================================================

Entry point: ``python -m recipes.bench_kernels`` (calls :func:`recipes.bench.cli.main`).
"""
