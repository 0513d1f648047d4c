"""Negatives across processes: every pairwise loss (info_nce in-batch, symmetric, with a queue,
MoCo; clip_loss; siglip; nt_xent; supcon (N, D) and (N, V, D); nca; n_pair; uniformity; triplet_margin
batch-hard, batch-all, semi-hard; drlim) with a gloo process group of R = 2 and R = 3 (an odd
world size) ranks against one process running the same loss on the concatenated batch.

The convention under test (``csrc_triton.distributed``): rank r passes its B local rows, the
keys / negatives are the global batch (the ranks' rows in rank order), and a scalar loss
returns ``loss_r = R * (rank r's share of the global loss)``. What DDP then does, derived:

* every rank backpropagates the same upstream gradient g (in training g = 1; here a random
  g), so the job-wide objective is J = g * sum_r loss_r = R * g * L, with L the loss of one
  process on the concatenated batch;
* through the all-gather / reduce-scatter of the keys, rank r's gradient of its local rows is
  dJ/dx_r = R * g * dL/dx_r: DDP's average over ranks of the parameter gradients those rows
  produce is therefore g * dL/dtheta, exactly the single-process gradient. So the test checks
  ``grad_r / R`` against the single-process gradient of those rows;
* a replicated tensor (a temperature, CLIP's logit scale, a MoCo queue) is a separate leaf on
  every rank; the leaves' gradients sum to dJ/dt = R * g * dL/dt, and DDP averages them: the
  test checks the mean over ranks against the single-process gradient. (A single rank's own
  gradient is not the single-process one and is not tested alone.)
* ``reduction="none"`` returns this rank's rows' terms, with no factor: the ranks' outputs
  concatenated equal the single-process output; with each rank's slice of a random upstream
  vector, the row gradients equal the single-process ones and the replicated leaves'
  gradients sum to the single-process one.

Labels are drawn so that positives cross ranks: a pair of rows with a label of their own sits
on the first and the last rank, one row has no positive at all (SupCon and NCA leave it out of
the global mean: the normaliser is summed over ranks), and the other labels are spread at
random. Blockwise backends in tiles of 2 rows x 3 columns (many tiles per rank; DrLIM both in
dense blocks and in its list-the-pairs-within-the-margin path), one CLIP and one semi-hard
case on the dense backend; outputs poisoned with NaN. Two dtypes:

* float64: the equivalence itself, at 1e-10 relative: any error in the convention, the
  gathering or the merging shows up far above the rounding;
* float32 (the training dtype): 1e-5 relative. The rank-split sums round differently from the
  one-process sums; an element that is a cancelling sum carries the rounding of its terms, so
  each tensor also gets 1e-5 of its largest element as an absolute floor, and a scalar
  parameter's gradient 1e-5 of the magnitude of its terms (see _check_equivalence).

Processes: importing torch and the first custom-op call cost a few CPU-seconds per process, so
one ``torch.multiprocessing.spawn`` of 3 gloo processes runs every case in three process
groups: the world of 3 (an odd world size), the subgroup of ranks (0, 1) (R = 2), and the
subgroup of ranks (1, 2), whose group ranks differ from the global ones. The ranks write their
outputs and gradients to a file, compared here in the parent with one process running the
same loss on the concatenated batch. The job starts through a ``file://`` store in a fresh
temporary folder (no port to pick), collectives time out after 60 s, and the parent stops its
children after 120 s, so a desynchronised case fails instead of hanging.

Also: ranks that pass different D, or different B, get a ValueError naming the argument and
every rank's shape, on every rank of every group; and a NaN in one feature of one rank's row
makes every rank's loss and gradients NaN (it is a key of every rank's rows).
"""
from __future__ import annotations

import contextlib
import time
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import csrc_triton
from csrc_triton import distances
from csrc_triton._testing import blockwise_rows, poison_outputs

B = 5  # local rows per rank: odd, and more than one block of BLOCK_ROWS
D = 11
V = 2  # views per sample for SupCon (N, V, D)
QUEUE = 7  # MoCo queue rows
BLOCK_ROWS, BLOCK_COLS = 2, 3  # blockwise tiles: many in both directions
DTYPES = {"float32": torch.float32, "float64": torch.float64}
#: relative tolerance per dtype: elementwise, plus that fraction of the tensor's largest
#: element as an absolute floor (an element that is a cancelling sum carries the rounding of
#: its terms, which are as large as the tensor's large elements); scalar-parameter gradients
#: get that fraction of the magnitude of their terms instead, see _check_equivalence
TOL = {"float32": 1e-5, "float64": 1e-10}
SPAWN_TIMEOUT_S = 120.0

#: inputs split along dim 0 across ranks (rank r gets rows r*B .. (r+1)*B - 1)
SHARDED = ("q", "k", "feat3", "labels")
#: inputs that are the same on every rank; ``queue_frozen`` needs no gradient
REPLICATED = ("t", "logit_scale", "logit_bias", "nca_scale", "unif_t", "queue", "queue_frozen")
FROZEN = ("queue_frozen", "labels")


def _global_inputs(world: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The global batch of R * B rows and the replicated tensors; the same in every process.
    Drawn in float32, then cast, so that both dtypes see the same values."""
    gen = torch.Generator().manual_seed(1000 + world)
    n = world * B

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (scale * torch.randn(*shape, generator=gen, dtype=torch.float32)).to(dtype)

    labels = torch.randint(0, 3, (n,), generator=gen)
    labels[0] = 100  # no positive anywhere in the group
    labels[1] = labels[n - 1] = 101  # a pair split between the first and the last rank
    q = randn(n, D, scale=0.6)
    return {
        "q": q,
        "k": q + randn(n, D, scale=0.4),  # correlated with q: the positives stand out
        "feat3": randn(n, V, D),
        "labels": labels,
        "t": torch.tensor(0.3, dtype=dtype),
        "logit_scale": torch.tensor(4.0, dtype=dtype),
        "logit_bias": torch.tensor(-2.0, dtype=dtype),
        "nca_scale": torch.tensor(0.7, dtype=dtype),
        "unif_t": torch.tensor(2.0, dtype=dtype),
        "queue": randn(QUEUE, D, scale=0.6),
        "queue_frozen": randn(QUEUE, D, scale=0.6),
        "up_scalar": (0.5 + torch.rand((), generator=gen)).to(dtype),
        "up_rows": randn(2 * n),  # upstream of reduction="none" outputs (up to 2N: NT-Xent)
    }


F = csrc_triton
BW = dict(backend="blockwise")

#: name -> (function of the local inputs and the group, output kind). Output kinds: "scalar"
#: (the convention above), "rows" (reduction="none", one term per local row), "views"
#: (NT-Xent's reduction="none": 2B terms, the rank's z1 rows then its z2 rows).
CASES = {
    "info_nce": (lambda x, g: F.info_nce(x["q"], x["k"], temperature=x["t"], process_group=g, **BW), "scalar"),
    "info_nce_symmetric": (
        lambda x, g: F.info_nce(x["q"], x["k"], temperature=x["t"], symmetric=True, process_group=g, **BW),
        "scalar"),
    "info_nce_queue": (
        lambda x, g: F.info_nce(x["q"], x["k"], temperature=x["t"], queue=x["queue"], process_group=g, **BW),
        "scalar"),
    "info_nce_moco": (
        lambda x, g: F.info_nce(x["q"], x["k"], temperature=x["t"], queue=x["queue_frozen"],
                                in_batch_negatives=False, process_group=g, **BW),
        "scalar"),
    "info_nce_sum": (
        lambda x, g: F.info_nce(x["q"], x["k"], temperature=0.5, reduction="sum", process_group=g, **BW), "scalar"),
    "info_nce_none": (
        lambda x, g: F.info_nce(x["q"], x["k"], temperature=x["t"], reduction="none", process_group=g, **BW),
        "rows"),
    "clip_loss": (lambda x, g: F.clip_loss(x["q"], x["k"], x["logit_scale"], process_group=g, **BW), "scalar"),
    "clip_loss_dense": (
        lambda x, g: F.clip_loss(x["q"], x["k"], x["logit_scale"], process_group=g, backend="dense"), "scalar"),
    # SigLIP (its own kernels): rank r's positives sit at global columns r B + i
    "siglip": (lambda x, g: F.siglip(x["q"], x["k"], x["logit_scale"], x["logit_bias"], process_group=g, **BW),
               "scalar"),
    "siglip_sum_dense": (
        lambda x, g: F.siglip(x["q"], x["k"], x["logit_scale"], x["logit_bias"], reduction="sum", process_group=g,
                              backend="dense"), "scalar"),
    "siglip_none_float_params": (
        lambda x, g: F.siglip(x["q"], x["k"], 3.0, -1.5, reduction="none", process_group=g, **BW), "rows"),
    "nt_xent": (lambda x, g: F.nt_xent(x["q"], x["k"], temperature=x["t"], process_group=g, **BW), "scalar"),
    "nt_xent_none_unnormalized": (
        lambda x, g: F.nt_xent(x["q"], x["k"], temperature=x["t"], normalize=False, reduction="none",
                               process_group=g, **BW),
        "views"),
    "supcon": (lambda x, g: F.supcon(x["q"], x["labels"], temperature=x["t"], process_group=g, **BW), "scalar"),
    "supcon_views": (
        lambda x, g: F.supcon(x["feat3"], x["labels"], temperature=x["t"], process_group=g, **BW), "scalar"),
    "nca": (lambda x, g: F.nca(x["q"], x["labels"], scale=x["nca_scale"], process_group=g, **BW), "scalar"),
    "nca_normalized_sum": (
        lambda x, g: F.nca(x["q"], x["labels"], scale=x["nca_scale"], normalize=True, reduction="sum",
                           process_group=g, **BW),
        "scalar"),
    "n_pair": (lambda x, g: F.n_pair(x["q"], x["k"], l2_reg=0.05, process_group=g, **BW), "scalar"),
    "uniformity": (lambda x, g: F.uniformity(0.5 * x["q"], t=x["unif_t"], process_group=g, **BW), "scalar"),
    # the distance losses (csrc_triton.triplet): anchors local, candidates the global batch
    "triplet_batch_hard": (
        lambda x, g: F.triplet_margin(x["q"], x["labels"], margin=1.0, mining="batch_hard", process_group=g, **BW),
        "scalar"),
    "triplet_batch_hard_soft_squared_none": (
        lambda x, g: F.triplet_margin(x["q"], x["labels"], margin=None, soft=True, distance="squared",
                                      reduction="none", process_group=g, **BW),
        "rows"),
    "triplet_batch_all": (
        lambda x, g: F.triplet_margin(x["q"], x["labels"], margin=1.0, mining="batch_all", process_group=g, **BW),
        "scalar"),
    "triplet_batch_all_cosine_sum": (
        lambda x, g: F.triplet_margin(x["q"], x["labels"], margin=0.5, mining="batch_all", distance="cosine",
                                      reduction="sum", process_group=g, **BW),
        "scalar"),
    "triplet_semi_hard": (
        lambda x, g: F.triplet_margin(x["q"], x["labels"], margin=1.0, mining="semi_hard", process_group=g, **BW),
        "scalar"),
    "triplet_semi_hard_dense": (
        lambda x, g: F.triplet_margin(x["q"], x["labels"], margin=1.0, mining="semi_hard", process_group=g,
                                      backend="dense"),
        "scalar"),
    "drlim": (lambda x, g: F.drlim(x["q"], x["labels"], margin=3.0, process_group=g, **BW), "scalar"),
    "drlim_none_sparse": (
        lambda x, g: F.drlim(x["q"], x["labels"], margin=3.0, reduction="none", process_group=g, **BW), "rows"),
}

#: one feature of the last global row (a key of every rank) is NaN: every rank's output must be
#: NaN, and every element ("all") or at least every row ("rows") of every gradient (DrLIM: a
#: dissimilar pair's gradient is a multiple of x_i - x_j, NaN only where x_j is)
NAN_CASES = {"info_nce": "all", "info_nce_symmetric": "all", "info_nce_queue": "all", "clip_loss": "all",
             "siglip": "all",
             "nt_xent": "all", "supcon": "all", "nca": "all", "n_pair": "all", "uniformity": "all",
             "triplet_batch_hard": "all", "drlim": "rows"}


def _nan_inputs(world: int) -> dict[str, torch.Tensor]:
    inputs = _global_inputs(world)
    for name in ("q", "k"):
        inputs[name] = inputs[name].clone()
        inputs[name][-1, 3] = float("nan")
    return inputs


#: (loss, argument named in the error) for the shape-mismatch checks; the bad tensor has one
#: more feature (or row) per rank
MISMATCH = {
    "info_nce": ("query", lambda a, b, lab, g: F.info_nce(a, b, process_group=g, **BW)),
    "clip_loss": ("image_features", lambda a, b, lab, g: F.clip_loss(a, b, 10.0, process_group=g, **BW)),
    "siglip": ("image_features", lambda a, b, lab, g: F.siglip(a, b, 10.0, -10.0, process_group=g, **BW)),
    "nt_xent": ("z1", lambda a, b, lab, g: F.nt_xent(a, b, process_group=g, **BW)),
    "supcon": ("features", lambda a, b, lab, g: F.supcon(a, lab, process_group=g, **BW)),
    "nca": ("embeddings", lambda a, b, lab, g: F.nca(a, lab, process_group=g, **BW)),
    "n_pair": ("anchors", lambda a, b, lab, g: F.n_pair(a, b, process_group=g, **BW)),
    "uniformity": ("x", lambda a, b, lab, g: F.uniformity(a, process_group=g, **BW)),
    "triplet_margin": ("embeddings", lambda a, b, lab, g: F.triplet_margin(a, lab, process_group=g, **BW)),
    "drlim": ("embeddings", lambda a, b, lab, g: F.drlim(a, lab, process_group=g, **BW)),
}

#: the process groups under test, all in one job of PROCESSES gloo processes: name -> the
#: global ranks of its members. "pair(1,2)" is a subgroup whose group ranks differ from the
#: global ones (global rank 1 is its rank 0): a loss that used global ranks, or the default
#: group, fails there.
PROCESSES = 3
GROUPS = {"world3": (0, 1, 2), "world2": (0, 1), "pair(1,2)": (1, 2)}


def _local(inputs: dict[str, torch.Tensor], rank: int, members: int) -> dict[str, torch.Tensor]:
    """This rank's leaves: its slice of the sharded inputs, a copy of the replicated ones."""
    out = {}
    for name in SHARDED + REPLICATED:
        x = inputs[name]
        if name in SHARDED:
            x = x[rank * B: (rank + 1) * B] if members > 1 else x
        x = x.clone()
        out[name] = x.requires_grad_(x.is_floating_point() and name not in FROZEN)
    return out


def _upstream(inputs: dict[str, torch.Tensor], kind: str, rank: int, members: int) -> torch.Tensor:
    """The random upstream gradient of this rank's output (the whole one when members == 1)."""
    if kind == "scalar":
        return inputs["up_scalar"]
    n = inputs["q"].shape[0]  # the global rows
    up = inputs["up_rows"]
    if members == 1:
        return up[: (2 * n if kind == "views" else n)]
    rows = slice(rank * B, (rank + 1) * B)
    if kind == "rows":
        return up[rows]
    # views: the global output is [z1 of all ranks; z2 of all ranks], this rank's is [z1_r; z2_r]
    return torch.cat([up[:n][rows], up[n:2 * n][rows]])


@contextlib.contextmanager
def _small_blocks(sparse: bool = False):
    """Outputs poisoned, and the blockwise backends in many small tiles; ``sparse``: DrLIM's
    blockwise path that lists the pairs within the margin (else its dense blocks)."""
    saved = distances.BLOCK_ROWS, distances.SPARSE_FRACTION
    distances.BLOCK_ROWS = BLOCK_ROWS
    distances.SPARSE_FRACTION = 1 if sparse else 10**9
    try:
        with poison_outputs(), blockwise_rows(BLOCK_ROWS, BLOCK_COLS):
            yield
    finally:
        distances.BLOCK_ROWS, distances.SPARSE_FRACTION = saved


def _run_case(fn, kind: str, inputs: dict, rank: int, members: int, group, name: str = "") -> dict:
    x = _local(inputs, rank, members)
    with _small_blocks(sparse=name.endswith("sparse")):
        out = fn(x, group)
        out.backward(_upstream(inputs, kind, rank, members))
    grads = {name: t.grad.clone() for name, t in x.items() if t.requires_grad and t.grad is not None}
    return {"out": out.detach().clone(), "grads": grads}


def _run_group(group, results: dict) -> None:
    """Every case and every mismatch check in ``group`` (this rank is a member)."""
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    results["group_rank"] = rank
    for dtype_name, dtype in DTYPES.items():
        inputs = _global_inputs(size, dtype)
        for name, (fn, kind) in CASES.items():
            try:
                results[name, dtype_name] = _run_case(fn, kind, inputs, rank, size, group, name)
            except Exception:  # recorded and reported by the parent, per case
                results[name, dtype_name] = {"error": traceback.format_exc()}
    # a NaN in one row of the last rank reaches every rank through the gathered keys
    inputs = _nan_inputs(size)
    for name in NAN_CASES:
        fn, kind = CASES[name]
        try:
            res = _run_case(fn, kind, inputs, rank, size, group)
            nan = (lambda g: g.isnan().all()) if NAN_CASES[name] == "all" else \
                (lambda g: g.isnan().reshape(g.shape[0], -1).any(1).all() if g.dim() else g.isnan())
            results["nan", name] = {"out": bool(res["out"].isnan().all()),
                                    "grads": {a: bool(nan(g)) for a, g in res["grads"].items()}}
        except Exception:
            results["nan", name] = {"error": traceback.format_exc()}
    # ranks that disagree on D, then on B: every rank must raise, none may hang
    gen = torch.Generator().manual_seed(7)
    for name, (_, fn) in MISMATCH.items():
        for what, shape in (("D", (B, D + rank)), ("B", (B + rank, D))):
            a = torch.randn(*shape, generator=gen)
            try:
                fn(a, a.clone(), torch.arange(shape[0]) % 2, group)
                results["mismatch", name, what] = {"raised": None, "message": ""}
            except Exception as err:
                results["mismatch", name, what] = {"raised": type(err).__name__, "message": str(err)}


def _worker(rank: int, folder: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=PROCESSES,
                            timeout=timedelta(seconds=60))
    results: dict[str, dict] = {}
    try:
        # every process creates every group, in the same order; only members use one
        groups = {name: dist.group.WORLD if len(members) == PROCESSES else dist.new_group(list(members))
                  for name, members in GROUPS.items()}
        for name, members in GROUPS.items():
            if rank in members:
                results[name] = {}
                _run_group(groups[name], results[name])
    finally:
        torch.save(results, Path(folder) / f"rank{rank}.pt")
        dist.destroy_process_group()


def _spawn(folder: Path, worker=_worker, nprocs: int = PROCESSES) -> list[dict]:
    ctx = mp.spawn(worker, args=(str(folder),), nprocs=nprocs, join=False)
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.terminate()
            pytest.fail(f"{nprocs} gloo processes did not finish within {SPAWN_TIMEOUT_S:.0f} s (a hang)")
    return [torch.load(folder / f"rank{r}.pt") for r in range(nprocs)]


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> list[dict]:
    """The results of every process of the one gloo job."""
    return _spawn(tmp_path_factory.mktemp("gloo"))


def _group_results(job: list[dict], group: str) -> list[dict]:
    """The members' results of ``group``, in group-rank order."""
    found = sorted((job[r][group] for r in GROUPS[group]), key=lambda res: res["group_rank"])
    assert [res["group_rank"] for res in found] == list(range(len(found)))
    return found


def _single(fn, kind: str, inputs: dict, name: str) -> dict:
    return _run_case(fn, kind, inputs, 0, 1, None, name)


def _check_equivalence(name: str, kind: str, ranks: list[dict], single: dict, inputs: dict,
                       dtype_name: str = "float32") -> None:
    world = len(ranks)
    rtol = TOL[dtype_name]
    for r, res in enumerate(ranks):
        assert "error" not in res, f"{name}: rank {r} of {world} raised:\n{res['error']}"
    # DDP's division by R for a scalar loss; none for the per-row outputs (see the docstring)
    factor = world if kind == "scalar" else 1
    if kind == "scalar":
        got = torch.stack([res["out"] for res in ranks]).mean()
    elif kind == "rows":
        got = torch.cat([res["out"] for res in ranks])
    else:
        got = torch.cat([res["out"][:B] for res in ranks] + [res["out"][B:] for res in ranks])
    assert torch.isfinite(single["out"]).all(), f"{name}: single-process output not finite"
    torch.testing.assert_close(got, single["out"], rtol=rtol, atol=rtol * float(single["out"].abs().max()),
                               msg=lambda m: f"{name}, {dtype_name}, world {world}: output: {m}")
    assert set(single["grads"]) == set(ranks[0]["grads"]), f"{name}: gradients of {sorted(single['grads'])} " \
        f"in one process but {sorted(ranks[0]['grads'])} on rank 0"
    # A scalar parameter p (temperature, logit scale, t) multiplies every logit, so its gradient
    # is a sum over all N M logits; by Euler's identity for the product s q.k, s dL/ds equals
    # sum_i q_i . dL/dq_i, whose terms have magnitudes sum_i |x_i * dL/dx_i|. Its rounding error
    # is relative to that, not to the (often much smaller, cancelling) result.
    terms = sum((inputs[a] * g).abs().sum() for a, g in single["grads"].items() if a in SHARDED)
    for arg, want in single["grads"].items():
        parts = [res["grads"][arg] for res in ranks]
        got = (torch.cat(parts) if arg in SHARDED else torch.stack(parts).sum(0)) / factor
        arg_atol = rtol * float(want.abs().max() if want.dim() else terms / inputs[arg].abs())
        torch.testing.assert_close(got, want, rtol=rtol, atol=arg_atol,
                                   msg=lambda m: f"{name}, {dtype_name}, world {world}: gradient of {arg}: {m}")
        assert want.abs().max() > 0, f"{name}: zero single-process gradient of {arg} (a vacuous check)"


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("group", list(GROUPS))
def test_matches_one_process_on_the_concatenated_batch(job, group, name, dtype_name):
    ranks = _group_results(job, group)
    fn, kind = CASES[name]
    inputs = _global_inputs(len(ranks), DTYPES[dtype_name])
    _check_equivalence(f"{name} in {group}", kind, [res[name, dtype_name] for res in ranks],
                       _single(fn, kind, inputs, name), inputs, dtype_name)


@pytest.mark.parametrize("group", list(GROUPS))
def test_nan_in_one_rank_reaches_every_rank(job, group):
    for r, res in enumerate(_group_results(job, group)):
        for name in NAN_CASES:
            got = res["nan", name]
            assert "error" not in got, f"{name} in {group}: rank {r} raised:\n{got['error']}"
            assert got["out"], f"{name} in {group}: rank {r}'s loss is not NaN with a NaN key on the last rank"
            assert got["grads"], f"{name}: no gradients recorded"
            for arg, all_nan in got["grads"].items():
                assert all_nan, f"{name} in {group}: rank {r}'s gradient of {arg} is not NaN in every " \
                    f"{'element' if NAN_CASES[name] == 'all' else 'row'}"


@pytest.mark.parametrize("group", list(GROUPS))
def test_different_shapes_raise_on_every_rank(job, group):
    ranks = _group_results(job, group)
    for name, (arg, _) in MISMATCH.items():
        for what in ("D", "B"):
            shapes = [(B, D + r) if what == "D" else (B + r, D) for r in range(len(ranks))]
            for r, res in enumerate(ranks):
                got = res["mismatch", name, what]
                assert got["raised"] == "ValueError", f"{name} in {group} with a different {what} per rank: " \
                    f"rank {r} raised {got['raised']}: {got['message']}"
                assert got["message"].startswith(f"{arg} must have the same shape on every rank"), got["message"]
                assert str(shapes) in got["message"], f"{got['message']!r} does not list every rank's shape {shapes}"


def _ndim_worker(rank: int, folder: str) -> None:
    """SupCon with (N, V, D) features on rank 0 and (N, D) on rank 1."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=2,
                            timeout=timedelta(seconds=30))
    result = {"raised": None, "message": ""}
    try:
        features = torch.randn(4, 2, D) if rank == 0 else torch.randn(4, D)
        F.supcon(features, torch.arange(4) % 2, process_group=dist.group.WORLD, **BW)
    except Exception as err:
        result = {"raised": type(err).__name__, "message": str(err)}
    finally:
        torch.save(result, Path(folder) / f"rank{rank}.pt")
        dist.destroy_process_group()


def test_different_ndim_raises_on_every_rank(tmp_path):
    ranks = _spawn(tmp_path, _ndim_worker, nprocs=2)
    for r, got in enumerate(ranks):
        assert got["raised"] == "ValueError", f"rank {r} raised {got['raised']}: {got['message']}"
        assert got["message"].startswith("features must have the same shape on every rank"), got["message"]
