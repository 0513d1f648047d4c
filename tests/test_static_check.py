"""Static sm_90 compilation of the Triton kernels (csrc_triton/static_check.py), no GPU needed.

The suite compiles every shipped variant (all 146; about 65 s on 2 cores with a cold Triton cache) and asserts zero
spills for each, as ``python -m csrc_triton.static_check`` does from the command line. Skipped, with the reason, where Triton's bundled
``ptxas`` cannot run.
"""
from __future__ import annotations

import os

import pytest

from csrc_triton import static_check, triton_lse
from csrc_triton.tile_configs import CONFIGS, BackwardConfig


def _ptxas_or_skip() -> None:
    try:
        path = static_check._ptxas_path(90)
    except (FileNotFoundError, ImportError, AttributeError) as err:
        pytest.skip(f"cannot compile for sm_90 here: Triton's bundled ptxas is unavailable ({err})")
    if not os.access(path, os.X_OK):
        pytest.skip(f"cannot compile for sm_90 here: Triton's bundled ptxas at {path} is not executable")


def test_variants_are_what_the_launchers_produce():
    """The fused-kernel output forms are read from backward_plan itself, and the list holds
    every constexpr combination of every kernel for every dtype."""
    found = set()
    config = BackwardConfig(block_m=64, block_n=64, block_d=64, block_do=128, num_warps=8, num_stages=3)
    for d in (64, 200, 768):
        for needs in range(16):
            needs_dq, needs_dk, needs_dbias, deterministic = (bool(needs >> bit & 1) for bit in range(4))
            for launch in triton_lse.backward_plan(5000, 3000, d, config, needs_dq=needs_dq, needs_dk=needs_dk,
                                                   needs_dbias=needs_dbias, deterministic=deterministic):
                if launch["kernel"] == "fused":
                    found.add((launch["NEEDS_DQ"], launch["NEEDS_DK"], launch["WIDE"]))
    assert found == set(static_check.fused_variants())
    jobs = static_check.variants()
    per_dtype = 4 + 6 * len(found) + 6 + 1 + 1  # forward, fused, rows, positive index, split sum
    assert len(jobs) == 3 * per_dtype + 2 == 146  # + the statistics merge (dtype-free)
    assert len(set(jobs)) == len(jobs)
    subset = static_check.variants(subset=True)
    assert set(subset) <= set(jobs) and {job.kernel for job in subset} == {job.kernel for job in jobs}


def test_every_variant_has_a_complete_signature():
    """Every argument of every kernel gets a type or a constexpr value (no compilation)."""
    for job in static_check.variants():
        source = static_check._source(job)
        fn = static_check._KERNELS[job.kernel]()
        assert set(source.signature) == set(fn.arg_names), job
        for name in triton_lse.RUNTIME_SCALARS:
            if name in fn.arg_names:
                assert source.signature[name] == "i32", (job.kernel, name)


def test_shipped_configs_respect_hardware_limits():
    """sm_90 bf16/fp16 tiles fit wgmma (BLOCK_M multiple of 64, warps multiple of 4) and the
    228 KiB of shared memory per SM, for every shipped forward and backward configuration."""
    for name in ("sm90-16", "sm90-32"):
        configs = CONFIGS[name]
        for config in (configs.forward, configs.forward_full or configs.forward, configs.backward):
            assert config.num_warps % 4 == 0 and config.block_m % (64 if name == "sm90-16" else 16) == 0, config
    backward = CONFIGS["sm90-16"].backward
    assert backward.block_do >= 128 and backward.wide_block_do <= backward.block_do


def test_every_variant_compiles_for_sm90_without_spills():
    _ptxas_or_skip()
    rows = static_check.static_report(arch=90)
    assert len(rows) == len(static_check.variants()) == 146
    for row in rows:
        where = f"{row['kernel']} {row['variant']} {row['dtype']} {row['tiles']}"
        assert 0 < row["registers"] <= 255, where
        assert row["spill_stores"] == 0 and row["spill_loads"] == 0, f"{where} spills: {row}"
        assert row["shared_bytes"] <= 228 * 1024, where
        if row["kernel"] in ("forward", "fused", "rows"):
            # bf16 tile products on sm_90 must use wgmma; fp32 uses IEEE products on FMA units.
            assert row["wgmma"] == (row["dtype"] != "fp32"), where
            assert row["ex2"] > 0, where  # exponentials are exp2 (log2 e folded into the scale)
    table = static_check.format_table(rows)
    assert "forward" in table and "fused" in table and "rows" in table and "wgmma" in table
