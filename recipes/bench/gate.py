"""Correctness gates, run in the parent before any timing: no number for a wrong loss.

:func:`backend_gate`: each measured backend against a float64 reference on a small odd-sized
problem (N = 131, not a multiple of any tile), the loss and the gradient of every leaf, under a
random upstream gradient. The reference is the ``dense`` backend run in float64 (dense is itself
checked against the formulas by the test suite). A backend passes where its relative RMS error is
at most twice dense's own error in the benchmark dtype plus a dtype tolerance (Cut
Cross-Entropy's rule: no worse than PyTorch itself in that precision).

:func:`peer_gate`: our loss (dense backend, float64) against the peer library's loss built on the
same float64 tensors (N = 66, P x K labels), loss and gradients. For a pair declared the same
loss, a relative RMS difference above :data:`PEER_TOL` refuses the comparison; for a pair
declared different (:attr:`recipes.bench.cases.Peer.same_loss` False) the difference is
measured and reported next to the stated reason.
"""
from __future__ import annotations

import math
from typing import Any

from . import cases
from .config import DTYPES, BenchConfig

CHECK_N = 131  # odd, not a multiple of any tile size
# Allowed relative-RMS error beyond what dense itself makes in the same dtype.
CHECK_TOL = {"fp32": 1e-4, "bf16": 3e-2, "fp16": 5e-3}
PEER_N = 66
PEER_D = 32
# float64 on both sides: what is left is rounding (cdist vs Gram-matrix distances, log-sum-exp
# orders), about 1e-15 relative; anything above 1e-9 is a different formula.
PEER_TOL = 1e-9


class CheckFailed(SystemExit):
    """Raised (exit status is the message) when a gate fails: nothing is timed or reported."""


def rel_rms(x, ref) -> float:
    """sqrt(mean((x - ref)^2)) / sqrt(mean(ref^2)) in float64 (inf if x is not finite)."""
    import torch

    x, ref = x.double(), ref.double()
    denom = torch.sqrt(torch.mean(ref * ref)).item()
    err = torch.sqrt(torch.mean((x - ref) ** 2)).item()
    if not math.isfinite(err):
        return math.inf
    return err / denom if denom > 0 else err


def _value_and_grads(problem: cases.Problem, run, seed: int):
    """(loss as a (1,) tensor, gradient of every leaf) for a random scalar upstream gradient."""
    import torch

    for leaf in problem.leaves:
        leaf.grad = None
    value = run()
    upstream = torch.randn((), generator=torch.Generator().manual_seed(seed + 1)).item()
    (value * upstream).backward()
    grads = [leaf.grad.detach().clone() if leaf.grad is not None else torch.zeros_like(leaf)
             for leaf in problem.leaves]
    return value.detach().reshape(1), grads


def backend_gate(cfg: BenchConfig, loss: str) -> list[dict[str, Any]]:
    """Each backend of ``cfg.backends`` against dense in float64, for one loss.

    Returns one report per backend: ``passed`` (True/False, or None when the loss is not in this
    checkout), ``errors`` (per output: relative RMS error, dense's own, allowed) and ``message``.
    """
    import torch

    case = cases.get(loss)
    ok, reason = case.available()
    if not ok:
        return [{"loss": loss, "backend": b, "passed": None, "message": reason, "errors": {}}
                for b in cfg.backends]
    dtype = getattr(torch, DTYPES[cfg.dtype])
    d = min(cfg.dim, 130)
    n = CHECK_N + (1 if case.even_n else 0)

    def run(backend: str, run_dtype):
        problem = case.problem(n, d, run_dtype, cfg.device, cfg.seed, cfg.scale, cfg.per_class)
        return _value_and_grads(problem, lambda: problem.call(backend), cfg.seed)

    truth = run("dense", torch.float64)
    dense_same = run("dense", dtype)
    names = ["loss"] + [f"grad[{i}]" for i in range(len(truth[1]))]
    truth_all = [truth[0], *truth[1]]
    dense_all = [dense_same[0], *dense_same[1]]
    reports = []
    for backend in cfg.backends:
        report: dict[str, Any] = {"loss": loss, "backend": backend, "n": n, "d": d,
                                  "dtype": cfg.dtype, "passed": True, "errors": {},
                                  "message": ""}
        try:
            got = run(backend, dtype)
        except Exception as exc:  # a backend that cannot run cannot be benchmarked either
            report["passed"] = False
            report["message"] = f"{type(exc).__name__}: {exc}"
            reports.append(report)
            continue
        bad = []
        for name, g, t, ref in zip(names, [got[0], *got[1]], truth_all, dense_all):
            if g.shape != t.shape:
                bad.append(f"{name}: shape {tuple(g.shape)} != {tuple(t.shape)}")
                continue
            err, ref_err = rel_rms(g, t), rel_rms(ref, t)
            allowed = 2 * ref_err + CHECK_TOL[cfg.dtype]
            report["errors"][name] = {"rel_rms": err, "dense_rel_rms": ref_err, "allowed": allowed}
            if not err <= allowed:
                bad.append(f"{name}: relative RMS error {err:.3g} > allowed {allowed:.3g}")
        if bad:
            report["passed"] = False
            report["message"] = "; ".join(bad)
        reports.append(report)
    return reports


def peer_gate(cfg: BenchConfig, loss: str) -> dict[str, Any]:
    """Our loss vs the peer's on the same small float64 input: loss and every gradient.

    Returns ``agree`` (relative RMS difference of every output <= PEER_TOL), ``passed``
    (agreement where the pair is declared the same loss; True for a declared difference, which
    is reported instead), the two loss values, per-output differences and a message.
    """
    import torch

    case = cases.get(loss)
    peer = case.peer
    report: dict[str, Any] = {"loss": loss, "peer": peer.name if peer else None,
                              "same_loss": peer.same_loss if peer else None,
                              "n": PEER_N, "d": min(cfg.dim, PEER_D), "errors": {},
                              "agree": None, "passed": None, "message": ""}
    ok, reason = case.available()
    if not ok:
        report["message"] = reason
        return report
    if peer is None:
        report["passed"] = False
        report["message"] = f"{loss} has no counterpart in the peer library"
        return report
    problem = case.problem(PEER_N, report["d"], torch.float64, "cpu", cfg.seed, cfg.scale,
                           cfg.per_class, with_peer=True)
    try:
        ours = _value_and_grads(problem, lambda: problem.call("dense"), cfg.seed)
        theirs = _value_and_grads(problem, problem.peer_call, cfg.seed)
    except Exception as exc:
        report["passed"] = False
        report["message"] = f"{type(exc).__name__}: {exc}"
        return report
    report["loss_ours"], report["loss_peer"] = ours[0].item(), theirs[0].item()
    names = ["loss"] + [f"grad[{i}]" for i in range(len(ours[1]))]
    worst = 0.0
    for name, a, b in zip(names, [ours[0], *ours[1]], [theirs[0], *theirs[1]]):
        err = rel_rms(b, a)
        report["errors"][name] = err
        worst = max(worst, err)
    report["agree"] = worst <= PEER_TOL
    if peer.same_loss:
        report["passed"] = report["agree"]
        report["message"] = (f"same loss: agree (largest relative difference {worst:.1e})"
                             if report["agree"] else
                             f"declared the same loss but they differ: loss ours "
                             f"{report['loss_ours']:.10g} vs {peer.name} "
                             f"{report['loss_peer']:.10g}, largest relative RMS difference "
                             f"{worst:.3g} > {PEER_TOL:g}")
    else:
        report["passed"] = True
        report["message"] = (f"different losses (loss ours {report['loss_ours']:.6g} vs "
                             f"{report['loss_peer']:.6g}): {peer.difference}")
    return report
