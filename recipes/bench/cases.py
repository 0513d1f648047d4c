"""What the kernel benchmark measures: one entry per tiled loss.

Each :class:`Case` says how to build the inputs for (N, D, dtype, device, seed), how to call the
loss of ``csrc_triton`` on them with a given backend, how much work one forward + backward is
(the FLOP count behind the GFLOP/s column), and, where pytorch-metric-learning (PML) has one,
how to build its counterpart on the *same* tensors. Adding a loss is one ``_register(Case(...))``.

The loss function is looked up in ``csrc_triton`` when a problem is built, not at import: a case
whose function this checkout does not have yet is reported as "not available in this checkout"
(:class:`NotAvailable`), never measured with a stand-in.

Inputs (all cases): feature rows are unit vectors, ``F.normalize(randn)`` drawn in float32 from a
CPU generator seeded with ``seed`` and then cast, so every dtype and both libraries see the same
numbers. Labelled losses get a P x K class-balanced batch (:func:`balanced_labels`): P = N // K
classes of K samples (K = ``per_class``, 4 by default), the N mod K leftover joining the last
class so no sample is alone in its class, in a random order.

N is the side of the N x N similarity matrix: rows for single-set losses; views for ``nt_xent``
(z1 and z2 have N/2 rows each); pairs for ``n_pair`` (N anchors against N positives).

Conventions set so that both libraries compute the same loss (checked numerically by
:func:`recipes.bench.gate.peer_gate` before any timing):

* neither side normalises: our losses are called with ``normalize=False`` where they have the
  flag, and PML's distances get ``normalize_embeddings=False`` (PML's default normalises). The
  inputs are unit rows, so the values are those of PML's defaults, and PML is spared the
  normalisation (in its favour);
* PML reducers are set to the plain mean where PML's default (mean over the non-zero terms)
  differs from ours.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch
from torch import Tensor

PML = "pytorch-metric-learning"
TRIPLET_MARGIN = 0.2
DRLIM_MARGIN = 1.0


class NotAvailable(RuntimeError):
    """The case's loss function is not in this checkout's ``csrc_triton``."""


@dataclasses.dataclass(frozen=True)
class Peer:
    """A loss of another library that computes (or nearly computes) one of ours.

    ``build(tensors, scale)`` returns a closure computing the peer's scalar loss on the same
    tensors the case built (so it backpropagates into the same leaves). ``same_loss`` says
    whether the two are the same function of the inputs (the gate then requires agreement of
    the loss and every gradient); when False, ``difference`` says why they cannot be made
    equal, and the comparison is reported as between different losses. ``bytes_beyond(n, k)``
    predicts the peak memory beyond the inputs at N rows, K per class, so that a size that
    cannot fit is not started (it need only be right within a factor of a few).
    """

    library: str
    name: str
    settings: str
    build: Callable[[dict[str, Tensor], float | None], Callable[[], Tensor]]
    same_loss: bool
    difference: str
    bytes_beyond: Callable[[int, int], float]
    #: how peak memory grows with N (2: N x N matrices; 3: NTXentLoss's pair x pair mask)
    memory_exponent: float = 2.0


@dataclasses.dataclass(frozen=True)
class Problem:
    """Inputs of one measurement: the leaves that get gradients, and the calls."""

    leaves: list[Tensor]
    call: Callable[[str], Tensor]
    peer_call: Callable[[], Tensor] | None = None


@dataclasses.dataclass(frozen=True)
class Case:
    """One tiled loss as the benchmark sees it (see the module docstring)."""

    name: str
    #: attribute of ``csrc_triton`` holding the loss function
    function: str
    #: one line: the call made, with its settings
    summary: str
    #: (generator, n, d, per_class) -> named float32 CPU tensors (features and labels)
    tensors: Callable[[torch.Generator, int, int, int], dict[str, Tensor]]
    #: names of the tensors that require gradients (the features; never labels)
    leaves: tuple[str, ...]
    #: (loss function, tensors, scale, backend) -> scalar loss
    call: Callable[[Callable[..., Tensor], dict[str, Tensor], float | None, str], Tensor]
    #: (n, d) -> FLOPs of one forward + backward, and the formula as text
    flops: Callable[[int, int], int]
    flop_formula: str
    #: logit multiplier when --scale is not given (None: the loss has none)
    default_scale: float | None = None
    scale_meaning: str = ""
    #: N must be even (it counts the views of N/2 pairs)
    even_n: bool = False
    labelled: bool = False
    #: feature rows held by the inputs at a given N (for memory predictions)
    feature_rows: Callable[[int], int] = lambda n: n
    #: a scalar leaf (clip's logit_scale) besides the features
    scalar_leaf: bool = False
    peer: Peer | None = None

    def available(self) -> tuple[bool, str]:
        """(True, "") when this checkout has the loss, else (False, the reason)."""
        try:
            import csrc_triton
        except Exception as exc:  # a broken package: say so rather than crash the listing
            return False, f"csrc_triton does not import: {type(exc).__name__}: {exc}"
        if callable(getattr(csrc_triton, self.function, None)):
            return True, ""
        return False, f"not available in this checkout (csrc_triton has no {self.function}())"

    def resolve_scale(self, scale: float | None) -> float | None:
        return self.default_scale if scale is None else scale

    def problem(self, n: int, d: int, dtype: torch.dtype, device: str | torch.device, seed: int,
                scale: float | None = None, per_class: int = 4, with_peer: bool = False
                ) -> Problem:
        """Build the inputs and the calls; raises :class:`NotAvailable` if the loss is missing."""
        import csrc_triton

        ok, reason = self.available()
        if not ok:
            raise NotAvailable(f"{self.name}: {reason}")
        if self.even_n and n % 2:
            raise ValueError(f"n={n}: expected an even N for {self.name} (N counts views)")
        scale = self.resolve_scale(scale)
        gen = torch.Generator(device="cpu").manual_seed(seed)
        named = self.tensors(gen, n, d, per_class)
        tensors: dict[str, Tensor] = {}
        for key, value in named.items():
            if value.is_floating_point():
                value = value.to(device=device, dtype=dtype).requires_grad_(key in self.leaves)
            else:
                value = value.to(device)
            tensors[key] = value
        leaves = [tensors[key] for key in self.leaves]
        if self.scalar_leaf:
            # clip's logit_scale: a float32 leaf whatever the feature dtype (float64 for float64)
            scalar_dtype = torch.float64 if dtype == torch.float64 else torch.float32
            tensors["scale"] = torch.tensor(scale, device=device, dtype=scalar_dtype,
                                            requires_grad=True)
            leaves.append(tensors["scale"])
        case = self

        def call(backend: str) -> Tensor:
            # looked up at call time, so a test can swap the function for a broken one
            return case.call(getattr(csrc_triton, case.function), tensors, scale, backend)

        peer_call = None
        if with_peer:
            if self.peer is None:
                raise ValueError(f"{self.name} has no peer loss to compare with")
            peer_call = self.peer.build(tensors, scale)
        return Problem(leaves=leaves, call=call, peer_call=peer_call)


CASES: dict[str, Case] = {}


def _register(case: Case) -> Case:
    CASES[case.name] = case
    return case


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


def unit_rows(gen: torch.Generator, rows: int, d: int) -> Tensor:
    """(rows, d) float32 unit vectors (Gaussian directions)."""
    return torch.nn.functional.normalize(torch.randn(rows, d, generator=gen), dim=-1)


def balanced_labels(gen: torch.Generator, n: int, per_class: int) -> Tensor:
    """(n,) int64 labels of a P x K batch in random order.

    P = max(n // K, 1) classes of K = ``per_class`` samples; the n mod K leftover samples join
    the last class (so every sample has at least one positive when n >= 2).
    """
    classes = max(n // per_class, 1)
    label = torch.clamp(torch.arange(n) // per_class, max=classes - 1)
    return label[torch.randperm(n, generator=gen)]


def _pair_of_views(gen: torch.Generator, n: int, d: int, per_class: int) -> dict[str, Tensor]:
    half = max(n // 2, 1)
    return {"z1": unit_rows(gen, half, d), "z2": unit_rows(gen, half, d)}


def _two_sets(first: str, second: str):
    def make(gen: torch.Generator, n: int, d: int, per_class: int) -> dict[str, Tensor]:
        return {first: unit_rows(gen, n, d), second: unit_rows(gen, n, d)}

    return make


def _one_set(name: str):
    def make(gen: torch.Generator, n: int, d: int, per_class: int) -> dict[str, Tensor]:
        return {name: unit_rows(gen, n, d)}

    return make


def _labelled(gen: torch.Generator, n: int, d: int, per_class: int) -> dict[str, Tensor]:
    return {"embeddings": unit_rows(gen, n, d), "labels": balanced_labels(gen, n, per_class)}


def _eight_nnd(n: int, d: int) -> int:
    """2NND forward (one GEMM-sized pass over the tiles) + 6NND backward (recompute, dQ, dK)."""
    return 8 * n * n * d


def _two_nnd(n: int, d: int) -> int:
    """2NND: one pass over the tiles; the backward only touches O(N) mined pairs (O(N D))."""
    return 2 * n * n * d


# --------------------------------------------------------------------------------------------
# pytorch-metric-learning counterparts
# --------------------------------------------------------------------------------------------


def _pml_triplet_batch_hard(t: dict[str, Tensor], scale: float | None) -> Callable[[], Tensor]:
    from pytorch_metric_learning import distances, losses, miners, reducers

    # Euclidean distances, not PML's normalised default (see the module docstring)
    miner = miners.BatchHardMiner(distance=distances.LpDistance(normalize_embeddings=False))
    loss = losses.TripletMarginLoss(margin=TRIPLET_MARGIN,
                                    distance=distances.LpDistance(normalize_embeddings=False),
                                    reducer=reducers.MeanReducer())
    emb, labels = t["embeddings"], t["labels"]
    return lambda: loss(emb, labels, miner(emb, labels))


def _pml_triplet_all(t: dict[str, Tensor], scale: float | None) -> Callable[[], Tensor]:
    from pytorch_metric_learning import distances, losses

    # no miner: every (anchor, positive, negative) triplet; the default reducer averages the
    # triplets whose loss is positive, as our batch_all "mean" does
    loss = losses.TripletMarginLoss(margin=TRIPLET_MARGIN,
                                    distance=distances.LpDistance(normalize_embeddings=False))
    emb, labels = t["embeddings"], t["labels"]
    return lambda: loss(emb, labels)


def _pml_nca(t: dict[str, Tensor], scale: float | None) -> Callable[[], Tensor]:
    from pytorch_metric_learning import distances, losses

    loss = losses.NCALoss(softmax_scale=scale,
                          distance=distances.LpDistance(normalize_embeddings=False, power=2))
    emb, labels = t["embeddings"], t["labels"]
    return lambda: loss(emb, labels)


def _pml_contrastive(t: dict[str, Tensor], scale: float | None) -> Callable[[], Tensor]:
    from pytorch_metric_learning import distances, losses

    loss = losses.ContrastiveLoss(pos_margin=0.0, neg_margin=DRLIM_MARGIN,
                                  distance=distances.LpDistance(normalize_embeddings=False))
    emb, labels = t["embeddings"], t["labels"]
    return lambda: loss(emb, labels)


def _pml_ntxent(t: dict[str, Tensor], scale: float | None) -> Callable[[], Tensor]:
    from pytorch_metric_learning import distances, losses

    loss = losses.NTXentLoss(temperature=1.0 / scale,
                             distance=distances.DotProductSimilarity(normalize_embeddings=False))
    z1, z2 = t["z1"], t["z2"]
    # view i and view i + N/2 share label i: each view's only positive is its partner
    labels = torch.arange(z1.shape[0], device=z1.device).repeat(2)
    return lambda: loss(torch.cat([z1, z2]), labels)


def _pml_supcon(t: dict[str, Tensor], scale: float | None) -> Callable[[], Tensor]:
    from pytorch_metric_learning import distances, losses

    loss = losses.SupConLoss(temperature=1.0 / scale,
                             distance=distances.DotProductSimilarity(normalize_embeddings=False))
    emb, labels = t["features"], t["labels"]
    return lambda: loss(emb, labels)


def _pml_npairs(t: dict[str, Tensor], scale: float | None) -> Callable[[], Tensor]:
    from pytorch_metric_learning import distances, losses

    loss = losses.NPairsLoss(distance=distances.DotProductSimilarity(normalize_embeddings=False))
    anchors, positives = t["anchors"], t["positives"]
    labels = torch.arange(anchors.shape[0], device=anchors.device).repeat(2)
    return lambda: loss(torch.cat([anchors, positives]), labels)


# Peak bytes beyond the inputs. PML's miners and pair losses build N x N matrices (distances,
# masks, clones) and torch.where index vectors over the N x N label masks (two int64 entries
# per negative pair); NTXentLoss also builds a (positive pairs) x (negative pairs) mask, cubic
# in N. Coefficients measured with PML 2.9.0 at N = 256..4096, fp32, D = 128, CPU (peak RSS
# beyond the inputs, rounded up); only used to avoid starting what cannot fit.
def _pml_bytes(per_n2: float):
    return lambda n, k: per_n2 * n * n


def _pml_all_triplets_bytes(n: int, k: int) -> float:
    # T = N (K - 1) (N - K) triplets: three int64 indices, two float distances, losses, masks;
    # below N^3 = 2^31 PML first builds the N x N x N uint8 triplet mask
    triplets = n * (k - 1) * max(n - k, 1)
    return 64.0 * triplets + (n ** 3 if n ** 3 < 2 ** 31 else 0) + 64.0 * n * n


def _pml_ntxent_bytes(n: int, k: int) -> float:
    # n positive pairs (one partner per view) x n (n - 2) negative pairs
    return 18.0 * n * n * max(n - 2, 1) + 64.0 * n * n


# --------------------------------------------------------------------------------------------
# The cases
# --------------------------------------------------------------------------------------------

_INVERSE_T = "1/temperature"

_register(Case(
    name="clip", function="clip_loss",
    summary="clip_loss(image, text, logit_scale): symmetric CLIP, logit_scale a float32 leaf",
    tensors=_two_sets("image", "text"), leaves=("image", "text"), scalar_leaf=True,
    call=lambda f, t, s, b: f(t["image"], t["text"], t["scale"], backend=b),
    flops=_eight_nnd, flop_formula="8*N*M*D", default_scale=1 / 0.07,
    scale_meaning="logit_scale", feature_rows=lambda n: 2 * n,
))

#: SigLIP's logit bias in the benchmark: the paper's initialisation (with logit_scale 10)
SIGLIP_BIAS = -10.0

_register(Case(
    name="siglip", function="siglip",
    summary=f"siglip(image, text, logit_scale, logit_bias={SIGLIP_BIAS}): SigLIP's sigmoid loss, "
            "logit_scale a float32 leaf (backend dense: the N x N PyTorch formula)",
    tensors=_two_sets("image", "text"), leaves=("image", "text"), scalar_leaf=True,
    call=lambda f, t, s, b: f(t["image"], t["text"], t["scale"], SIGLIP_BIAS, backend=b),
    flops=_eight_nnd, flop_formula="8*N*M*D", default_scale=10.0,
    scale_meaning="logit_scale", feature_rows=lambda n: 2 * n,
))

_register(Case(
    name="info_nce", function="info_nce",
    summary="info_nce(query, key, temperature=1/scale)",
    tensors=_two_sets("query", "key"), leaves=("query", "key"),
    call=lambda f, t, s, b: f(t["query"], t["key"], temperature=1 / s, backend=b),
    flops=_eight_nnd, flop_formula="8*N*M*D", default_scale=1 / 0.07,
    scale_meaning=_INVERSE_T, feature_rows=lambda n: 2 * n,
))

_register(Case(
    name="nt_xent", function="nt_xent",
    summary="nt_xent(z1, z2, temperature=1/scale, normalize=False), N = 2 x rows of z1",
    tensors=_pair_of_views, leaves=("z1", "z2"), even_n=True,
    call=lambda f, t, s, b: f(t["z1"], t["z2"], temperature=1 / s, normalize=False, backend=b),
    flops=_eight_nnd, flop_formula="8*N*M*D", default_scale=1 / 0.5, scale_meaning=_INVERSE_T,
    peer=Peer(
        library=PML, name="NTXentLoss",
        settings="NTXentLoss(temperature=1/scale, distance=DotProductSimilarity("
                 "normalize_embeddings=False)) on cat(z1, z2), labels [0..N/2) twice",
        build=_pml_ntxent, same_loss=True, difference="", bytes_beyond=_pml_ntxent_bytes,
        memory_exponent=3.0),
))

_register(Case(
    name="supcon", function="supcon",
    summary="supcon(features, labels, temperature=1/scale, normalize=False), P x K labels",
    tensors=lambda g, n, d, k: {"features": unit_rows(g, n, d),
                                "labels": balanced_labels(g, n, k)},
    leaves=("features",), labelled=True,
    call=lambda f, t, s, b: f(t["features"], t["labels"], temperature=1 / s, normalize=False,
                              backend=b),
    flops=_eight_nnd, flop_formula="8*N*M*D", default_scale=1 / 0.1, scale_meaning=_INVERSE_T,
    peer=Peer(
        library=PML, name="SupConLoss",
        settings="SupConLoss(temperature=1/scale, distance=DotProductSimilarity("
                 "normalize_embeddings=False)), default reducer (mean over anchors with a "
                 "positive, as ours)",
        build=_pml_supcon, same_loss=True, difference="", bytes_beyond=_pml_bytes(64.0)),
))

_register(Case(
    name="nca", function="nca",
    summary="nca(embeddings, labels, scale=scale, normalize=False), P x K labels",
    tensors=_labelled, leaves=("embeddings",), labelled=True,
    call=lambda f, t, s, b: f(t["embeddings"], t["labels"], scale=s, normalize=False, backend=b),
    flops=_eight_nnd, flop_formula="8*N*M*D", default_scale=1.0,
    scale_meaning="multiplier of the negative squared distances",
    peer=Peer(
        library=PML, name="NCALoss",
        settings="NCALoss(softmax_scale=scale, distance=LpDistance(normalize_embeddings=False, "
                 "power=2)), default mean reducer",
        build=_pml_nca, same_loss=True, difference="", bytes_beyond=_pml_bytes(48.0)),
))

_register(Case(
    name="triplet_margin", function="triplet_margin",
    summary=f"triplet_margin(embeddings, labels, margin={TRIPLET_MARGIN}, mining='batch_hard', "
            "distance='euclidean'), P x K labels",
    tensors=_labelled, leaves=("embeddings",), labelled=True,
    call=lambda f, t, s, b: f(t["embeddings"], t["labels"], margin=TRIPLET_MARGIN,
                              mining="batch_hard", distance="euclidean", backend=b),
    flops=_two_nnd, flop_formula="2*N*M*D",
    peer=Peer(
        library=PML, name="TripletMarginLoss + BatchHardMiner",
        settings=f"TripletMarginLoss(margin={TRIPLET_MARGIN}, distance=LpDistance("
                 "normalize_embeddings=False), reducer=MeanReducer()) on the triplets of "
                 "BatchHardMiner(distance=LpDistance(normalize_embeddings=False)) (PML's default "
                 "reducer averages only the non-zero triplets)",
        build=_pml_triplet_batch_hard, same_loss=True, difference="",
        bytes_beyond=_pml_bytes(42.0)),
))

_register(Case(
    name="triplet_margin_batch_all", function="triplet_margin",
    summary=f"triplet_margin(embeddings, labels, margin={TRIPLET_MARGIN}, mining='batch_all')",
    tensors=_labelled, leaves=("embeddings",), labelled=True,
    call=lambda f, t, s, b: f(t["embeddings"], t["labels"], margin=TRIPLET_MARGIN,
                              mining="batch_all", distance="euclidean", backend=b),
    flops=_eight_nnd, flop_formula="8*N*M*D",
    peer=Peer(
        library=PML, name="TripletMarginLoss (all triplets)",
        settings=f"TripletMarginLoss(margin={TRIPLET_MARGIN}, distance=LpDistance("
                 "normalize_embeddings=False)) with no miner (every triplet) and its default "
                 "reducer (mean over the triplets with a positive loss, as ours)",
        build=_pml_triplet_all, same_loss=True, difference="",
        bytes_beyond=_pml_all_triplets_bytes, memory_exponent=3.0),
))

_register(Case(
    name="triplet_margin_semi_hard", function="triplet_margin",
    summary=f"triplet_margin(embeddings, labels, margin={TRIPLET_MARGIN}, mining='semi_hard')",
    tensors=_labelled, leaves=("embeddings",), labelled=True,
    call=lambda f, t, s, b: f(t["embeddings"], t["labels"], margin=TRIPLET_MARGIN,
                              mining="semi_hard", distance="euclidean", backend=b),
    flops=_two_nnd, flop_formula="2*N*M*D",
))

_register(Case(
    name="drlim", function="drlim",
    summary=f"drlim(embeddings, labels, margin={DRLIM_MARGIN}), P x K labels",
    tensors=_labelled, leaves=("embeddings",), labelled=True,
    call=lambda f, t, s, b: f(t["embeddings"], t["labels"], margin=DRLIM_MARGIN, backend=b),
    flops=_eight_nnd, flop_formula="8*N*M*D",
    peer=Peer(
        library=PML, name="ContrastiveLoss",
        settings=f"ContrastiveLoss(pos_margin=0, neg_margin={DRLIM_MARGIN}, distance=LpDistance("
                 "normalize_embeddings=False)), default reducer",
        build=_pml_contrastive, same_loss=False,
        difference="PML's ContrastiveLoss is the hinge on plain distances, relu(d) for "
                   "positive pairs and relu(margin - d) for negative ones, each kind averaged "
                   "over its non-zero terms and the two averages added; DrLIM (Hadsell et al. "
                   "2006) squares both terms (d^2 / 2 and relu(margin - d)^2 / 2). No PML "
                   "setting squares the hinge (power=2 squares d inside it), so the two cannot "
                   "be made equal; the timing compares two O(N^2) pair losses of the same shape",
        bytes_beyond=_pml_bytes(40.0)),
))

_register(Case(
    name="n_pair", function="n_pair",
    summary="n_pair(anchors, positives, l2_reg=0.0): N anchors against N positives",
    tensors=_two_sets("anchors", "positives"), leaves=("anchors", "positives"),
    call=lambda f, t, s, b: f(t["anchors"], t["positives"], l2_reg=0.0, backend=b),
    flops=_eight_nnd, flop_formula="8*N*M*D", feature_rows=lambda n: 2 * n,
    peer=Peer(
        library=PML, name="NPairsLoss",
        settings="NPairsLoss(distance=DotProductSimilarity(normalize_embeddings=False)) on "
                 "cat(anchors, positives), labels [0..N) twice; no embedding regulariser "
                 "(ours with l2_reg=0)",
        build=_pml_npairs, same_loss=True, difference="", bytes_beyond=_pml_bytes(96.0)),
))

_register(Case(
    name="uniformity", function="uniformity",
    summary="uniformity(x, t=scale): log mean over pairs of exp(-t |x_i - x_j|^2)",
    tensors=_one_set("x"), leaves=("x",),
    call=lambda f, t, s, b: f(t["x"], t=s, backend=b),
    flops=_eight_nnd, flop_formula="8*N*M*D", default_scale=2.0,
    scale_meaning="t, the multiplier of the squared distances",
))

LOSSES: tuple[str, ...] = tuple(CASES)


def get(name: str) -> Case:
    """The case called ``name`` (ValueError naming the known ones otherwise)."""
    try:
        return CASES[name]
    except KeyError:
        raise ValueError(f"loss={name!r}: expected one of {', '.join(CASES)}") from None


def with_peer(peer: str) -> tuple[str, ...]:
    """Names of the cases that have a counterpart in the peer library (``"pml"``)."""
    library = {"pml": PML}[peer]
    return tuple(name for name, case in CASES.items()
                 if case.peer is not None and case.peer.library == library)


def describe() -> list[dict[str, Any]]:
    """One row per case: name, call, FLOP formula, availability, peer (for --list-losses)."""
    rows = []
    for case in CASES.values():
        ok, reason = case.available()
        rows.append({"loss": case.name, "call": case.summary, "flops": case.flop_formula,
                     "available": ok, "reason": reason,
                     "peer": (f"{case.peer.name}" + ("" if case.peer.same_loss
                                                     else " (a different loss)"))
                     if case.peer else "-"})
    return rows
