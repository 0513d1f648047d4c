"""The benchmark's configuration: one dataclass, printed at start and saved in every JSON file.

Constants that several modules share (dtype names, default sizes) live here too, so that no
module imports another only for a constant.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

#: dtype flag value -> torch dtype name
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
BACKENDS = ("triton", "blockwise", "dense")
#: peer libraries that ``--compare`` knows
PEERS = ("pml",)
DEFAULT_CPU_SIZES = (1024, 2048, 4096, 8192)
DEFAULT_CUDA_SIZES = (4096, 8192, 16384, 32768, 65536)
#: samples per class of the labelled losses' P x K batches
DEFAULT_PER_CLASS = 4
REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclasses.dataclass
class BenchConfig:
    """Everything one benchmark run depends on.

    ``losses`` are names of :data:`recipes.bench.cases.CASES`; ``compare`` is None for the
    backend benchmark or a peer library (``"pml"``) for the side-by-side comparison, in which
    case ``backends`` names our backend(s) measured against the peer.
    """

    backends: tuple[str, ...]
    sizes: tuple[int, ...]
    dim: int = 128
    dtype: str = "fp32"
    losses: tuple[str, ...] = ("clip",)
    device: str = "cpu"
    repeats: int = 5
    max_n_search: int = 16384
    mem_budget_gb: float = 20.0
    time_budget_s: float = 900.0
    out: str = "bench_results"
    static: bool = False
    check: bool = True
    warmup: int = 1
    seed: int = 0
    scale: float | None = None
    compare: str | None = None
    per_class: int = DEFAULT_PER_CLASS

    @property
    def on_cuda(self) -> bool:
        return self.device.startswith("cuda")
