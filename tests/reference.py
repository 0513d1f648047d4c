"""Plain dense reference implementations, written from the maths, for the tests.

Everything here materialises the full N x M logits and uses ``torch.logsumexp`` /
``F.cross_entropy`` on them, in whatever dtype its inputs have. The tests evaluate them twice:
in float64 on the already-rounded inputs (the ground truth) and in the dtype under test
("torch in the same dtype", the error budget of the Cut Cross-Entropy acceptance rule).

They are the documentation of record for what each quantity means, and share no code with
``csrc_triton``:

* :func:`lse_contract_ref`: the core op's contract (``csrc_triton/backend.py``'s docstring):
  Z_ij = s q_i . k_j + b_j, the excluded self column j = i + self_offset, positives by index or
  by labels, row / column log-sum-exp, positive sum and positive log-sum-exp;
* the losses: InfoNCE / MoCo, CLIP, NT-Xent, SupCon (L_out), NCA, the multi-class N-pair loss
  and uniformity, each from its paper's definition (NCA and uniformity from explicit
  differences x_i - x_j, not from the dot-product expansion the engine uses).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def _reduce(per_item: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return per_item.mean()
    if reduction == "sum":
        return per_item.sum()
    if reduction == "none":
        return per_item
    raise ValueError(reduction)


# ----------------------------------------------------------------------------------------------
# The core op
# ----------------------------------------------------------------------------------------------
def allowed_mask(n: int, m: int, self_offset: int | None) -> Tensor:
    """(N, M) bool: False exactly at (i, i + self_offset) where that column exists."""
    allowed = torch.ones(n, m, dtype=torch.bool)
    if self_offset is not None:
        for i in range(n):
            j = i + self_offset
            if 0 <= j < m:
                allowed[i, j] = False
    return allowed


def positive_mask(n: int, m: int, self_offset: int | None, positive_index: Tensor | None = None,
                  row_labels: Tensor | None = None, col_labels: Tensor | None = None) -> Tensor:
    """(N, M) bool: j in P(i). P(i) = {positive_index[i]} (empty if negative), or the columns
    with row i's label; only allowed entries (the excluded self column is never a positive)."""
    pos = torch.zeros(n, m, dtype=torch.bool)
    if positive_index is not None:
        for i, j in enumerate(positive_index.tolist()):
            if j >= 0:
                pos[i, j] = True
    elif row_labels is not None:
        pos = row_labels.cpu()[:, None] == col_labels.cpu()[None, :]
    return pos & allowed_mask(n, m, self_offset)


def masked_logsumexp(z: Tensor, mask: Tensor, dim: int) -> Tensor:
    """log sum over the masked entries of exp(z); -inf (with a zero gradient) where the set is
    empty. torch.logsumexp of an all -inf slice would give a NaN gradient."""
    empty = ~mask.any(dim=dim, keepdim=True)
    safe = torch.where(mask & ~empty, z, torch.full_like(z, -math.inf))
    safe = torch.where(empty, torch.zeros_like(z), safe)
    out = torch.logsumexp(safe, dim=dim, keepdim=True)
    return torch.where(empty, torch.full_like(out, -math.inf), out).squeeze(dim)


def lse_contract_ref(q: Tensor, k: Tensor, scale: Tensor, col_bias: Tensor | None = None,
                     self_offset: int | None = None, positive_index: Tensor | None = None,
                     row_labels: Tensor | None = None, col_labels: Tensor | None = None) -> dict[str, Tensor]:
    """Every output of ``contrastive::lse``, dense and differentiable, in the inputs' dtype.

        Z_ij = s q_i . k_j + b_j
        row_lse_i      = log sum_{allowed j} exp(Z_ij)      (-inf if none)
        col_lse_j      = log sum_{allowed i} exp(Z_ij)      (-inf if none)
        positive_sum_i = sum_{j in P(i)} Z_ij                (0 if P(i) is empty)
        positive_lse_i = log sum_{j in P(i)} exp(Z_ij)       (-inf if P(i) is empty)

    Also returned: ``logits`` (Z, so that a test can differentiate with respect to it: G = dL/dZ),
    ``allowed`` and ``positive`` (the (N, M) masks).
    """
    n, m = q.shape[0], k.shape[0]
    z = scale * (q @ k.T)
    if col_bias is not None:
        z = z + col_bias[None, :]
    allowed = allowed_mask(n, m, self_offset).to(q.device)
    pos = positive_mask(n, m, self_offset, positive_index, row_labels, col_labels).to(q.device)
    return {
        "row_lse": masked_logsumexp(z, allowed, 1),
        "col_lse": masked_logsumexp(z, allowed, 0),
        "positive_sum": torch.where(pos, z, torch.zeros_like(z)).sum(dim=1),
        "positive_lse": masked_logsumexp(z, pos, 1),
        "logits": z,
        "allowed": allowed,
        "positive": pos,
    }


# ----------------------------------------------------------------------------------------------
# The losses
# ----------------------------------------------------------------------------------------------
def info_nce_ref(query, key, temperature=0.07, queue=None, in_batch_negatives=True, symmetric=False,
                 reduction="mean"):
    """InfoNCE / MoCo: row i of the logits holds q_i.k_i (the positive) and the negatives."""
    n = query.shape[0]
    if in_batch_negatives:
        # positive on the diagonal of q @ k.T; every other key a negative.
        blocks = [query @ key.T]
        target = torch.arange(n, device=query.device)
    else:
        # MoCo: positive logit in column 0, then the queue.
        blocks = [(query * key).sum(dim=1, keepdim=True)]
        target = torch.zeros(n, dtype=torch.long, device=query.device)
    if queue is not None:
        blocks.append(query @ queue.T)
    logits = torch.cat(blocks, dim=1) / temperature
    row = F.cross_entropy(logits, target, reduction="none")
    if not symmetric:
        return _reduce(row, reduction)
    assert queue is None and in_batch_negatives
    col = F.cross_entropy((key @ query.T) / temperature, target, reduction="none")
    return _reduce((row + col) / 2, reduction)


def clip_loss_ref(image_features, text_features, logit_scale):
    """OpenCLIP's ClipLoss (one process): (CE(L, arange) + CE(L.T, arange)) / 2."""
    logits = logit_scale * (image_features @ text_features.T)
    target = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def nt_xent_ref(z1, z2, temperature=0.5, normalize=True, reduction="mean"):
    """SimCLR NT-Xent over the 2N views cat(z1, z2); view i's positive is view (i + N) mod 2N."""
    n = z1.shape[0]
    z = torch.cat([z1, z2], dim=0)
    if normalize:
        z = F.normalize(z, dim=1)
    logits = (z @ z.T) / temperature
    self_mask = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    idx = torch.arange(n, device=z.device)
    target = torch.cat([idx + n, idx])
    return _reduce(F.cross_entropy(logits, target, reduction="none"), reduction)


def supcon_ref(features, labels, temperature=0.1, normalize=True):
    """Khosla et al. 2020, eq. 2 (L_out), over every view as an anchor.

    Views of a (N, V, D) input are laid out view-major, as in the paper's code; the mean over
    anchors does not depend on that order.
    """
    if features.dim() == 3:
        v = features.shape[1]
        z = torch.cat(torch.unbind(features, dim=1), dim=0)
        lab = labels.repeat(v)
    else:
        z = features
        lab = labels
    if normalize:
        z = F.normalize(z, dim=1)
    m = z.shape[0]
    logits = (z @ z.T) / temperature
    self_mask = torch.eye(m, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    positive = (lab[:, None] == lab[None, :]) & ~self_mask
    n_pos = positive.sum(dim=1)
    has_pos = n_pos > 0
    if not bool(has_pos.any()):
        raise ValueError("no anchor has a positive")
    # where() rather than multiply: log_prob is -inf on the diagonal.
    pos_sum = torch.where(positive, log_prob, torch.zeros_like(log_prob)).sum(dim=1)
    per_anchor = -pos_sum[has_pos] / n_pos[has_pos].to(pos_sum.dtype)
    return per_anchor.mean()


def squared_distances(x: Tensor) -> Tensor:
    """(N, N) ||x_i - x_j||^2 from the explicit differences (no dot-product expansion)."""
    diff = x[:, None, :] - x[None, :, :]
    return (diff * diff).sum(dim=-1)


def nca_ref(embeddings, labels, scale=1.0, normalize=False, reduction="mean"):
    """NCA (Goldberger et al. 2004): p_ij = softmax over j != i of -s ||x_i - x_j||^2,
    loss_i = -log sum_{j != i, y_j = y_i} p_ij; "mean" over the anchors with a positive, "sum"
    over them, "none": (N,) with 0 for anchors without a positive."""
    x = F.normalize(embeddings, dim=1) if normalize else embeddings
    n = x.shape[0]
    self_mask = torch.eye(n, dtype=torch.bool, device=x.device)
    logits = (-scale * squared_distances(x)).masked_fill(self_mask, -math.inf)
    log_p = torch.log_softmax(logits, dim=1)
    same = (labels[:, None] == labels[None, :]) & ~self_mask
    has_pos = same.any(dim=1)
    per_anchor = -masked_logsumexp(log_p, same, 1)  # +inf without a positive, zeroed below
    per_anchor = torch.where(has_pos, per_anchor, torch.zeros_like(per_anchor))
    if reduction == "none":
        return per_anchor
    if reduction == "sum":
        return per_anchor.sum()
    return per_anchor.sum() / has_pos.sum()


def n_pair_ref(anchors, positives, l2_reg=0.002):
    """Multi-class N-pair loss (Sohn 2016, eq. 7 and the l2 regulariser of section 3.2.2):
    mean_i log(1 + sum_{j != i} exp(f_i . f+_j - f_i . f+_i)) + l2_reg * mean_{2N} |f|^2."""
    sim = anchors @ positives.T
    n = sim.shape[0]
    off = ~torch.eye(n, dtype=torch.bool, device=sim.device)
    diff = sim - sim.diagonal()[:, None]
    # log(1 + sum_{j != i} exp(d_ij)) = logsumexp over {0} and the d_ij, j != i
    terms = torch.cat([torch.zeros(n, 1, dtype=sim.dtype, device=sim.device),
                       diff.masked_fill(~off, -math.inf)], dim=1)
    contrastive = torch.logsumexp(terms, dim=1).mean()
    norms = torch.cat([(anchors * anchors).sum(dim=1), (positives * positives).sum(dim=1)])
    return contrastive + l2_reg * norms.mean()


def uniformity_ref(x, t=2.0):
    """Wang and Isola 2020: log mean_{i != j} exp(-t ||x_i - x_j||^2)."""
    n = x.shape[0]
    off = ~torch.eye(n, dtype=torch.bool, device=x.device)
    logits = -t * squared_distances(x)
    return torch.logsumexp(logits[off], dim=0) - math.log(n * (n - 1))


# ----------------------------------------------------------------------------------------------
# Acceptance rules shared by the test modules
# ----------------------------------------------------------------------------------------------
#: Relative tolerance on top of torch's own error in that dtype: about one unit in the last
#: place of the output dtype (float32: a little more, for reordered float32 sums).
RTOL = {torch.float64: 1e-12, torch.float32: 2e-5, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}
#: Mantissa bits of the 16-bit dtypes (for the one-rounding bound).
MANTISSA = {torch.bfloat16: 7, torch.float16: 10}
EPS = {torch.float64: torch.finfo(torch.float64).eps, torch.float32: torch.finfo(torch.float32).eps}


def param_id(x) -> str:
    """A short pytest id for a parametrised value: ``torch.float16`` -> ``float16``,
    ``(7, 60)`` -> ``7x60``, anything else ``str(x)`` (``pytest.mark.parametrize(..., ids=param_id)``)."""
    if isinstance(x, torch.dtype):
        return str(x).replace("torch.", "")
    if isinstance(x, tuple):
        return "x".join(map(str, x))
    return str(x)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _first_bad(name: str, bad: Tensor, out: Tensor, truth: Tensor, allowed: Tensor, extra: str = "") -> None:
    if bad.any():
        i = int(bad.flatten().nonzero()[0])
        err = (out - truth).abs()
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{bad.numel()} elements off; first at flat index {i}: "
            f"out={out.flatten()[i].item():.9g} truth={truth.flatten()[i].item():.9g} "
            f"allowed error {allowed.flatten()[i].item():.3g}{extra}; "
            f"max |err|={err.nan_to_num(float('inf')).max().item():.3g}"
        )


def assert_within(name: str, out: Tensor, truth: Tensor, tol: Tensor | float) -> None:
    """|out - truth| <= tol elementwise; infinities must match exactly; a NaN anywhere in out
    (or an element that is not where truth is) fails."""
    assert out.shape == truth.shape, f"{name}: shape {tuple(out.shape)}, expected {tuple(truth.shape)}"
    out, truth = out.detach().double().cpu(), truth.detach().double().cpu()
    tol = torch.as_tensor(tol, dtype=torch.float64).expand_as(truth)
    inf = torch.isinf(truth)
    err = (out - truth).abs()
    ok = torch.where(inf, out == truth, err <= tol)
    _first_bad(name, ~ok, out, truth, torch.where(inf, torch.zeros_like(tol), tol))


def ulp16(x: Tensor, dtype: torch.dtype) -> Tensor:
    """One unit in the last place of ``dtype`` (bf16 / fp16) at |x| (x float64)."""
    _, e = torch.frexp(x.abs())
    ulp = torch.ldexp(torch.ones_like(x), e - 1 - MANTISSA[dtype])
    smallest = torch.finfo(dtype).smallest_normal * 2.0 ** -MANTISSA[dtype]
    return ulp.clamp(min=smallest)


def assert_one_rounding(name: str, out: Tensor, truth: Tensor, acc_tol: Tensor | float, dtype: torch.dtype) -> None:
    """A 16-bit result that was accumulated in float32 and rounded once to ``dtype``:
    |out - truth| <= (half an ulp of dtype, at the larger of |out| and |truth|) + the float32
    accumulation error ``acc_tol``."""
    out64, truth64 = out.detach().double().cpu(), truth.detach().double().cpu()
    bound = 0.5 * ulp16(torch.maximum(out64.abs(), truth64.abs()).nan_to_num(0.0), dtype) + acc_tol
    assert_within(f"{name} (one rounding to {dtype})", out64, truth64, bound)


def assert_no_worse_than_torch(name, out, truth, low, dtype, floor=0.0):
    """|truth - out| <= |truth - low| + tol, elementwise; NaN in out fails.

    tol = rtol * (|truth| + max|truth|) + floor: about an ulp of the output dtype, plus an
    absolute ``floor`` for values that cancel to ~0 from much larger terms (see
    :func:`check_loss`).
    """
    assert out.shape == truth.shape, f"{name}: shape {tuple(out.shape)}, expected {tuple(truth.shape)}"
    out = out.detach().double()
    truth = truth.detach().double()
    low = low.detach().double()
    rtol = RTOL[dtype]
    scale = truth.abs().max().item() if truth.numel() else 0.0
    tol = rtol * (truth.abs() + scale) + floor
    allowed = (low - truth).abs().nan_to_num(0.0) + tol
    err = (out - truth).abs()
    bad = ~(err <= allowed)  # NaN in out counts as bad
    _first_bad(f"{name} ({dtype})", bad, out, truth, allowed,
               extra=f" torch-{dtype}={low.flatten()[int(bad.flatten().nonzero()[0])].item():.6g}" if bad.any() else "")


def upstream(shape, seed: int = 1234, *, zeros: float = 0.25, nonnegative: bool = False) -> Tensor:
    """A random upstream gradient (float64), magnitudes in [0.5, 1.5), random signs unless
    ``nonnegative``, and a fraction ``zeros`` of exact zeros."""
    g = torch.Generator().manual_seed(seed)
    mag = 0.5 + torch.rand(shape, generator=g, dtype=torch.float64)
    if not nonnegative:
        mag = mag * torch.where(torch.rand(shape, generator=g) < 0.5, -1.0, 1.0).double()
    return torch.where(torch.rand(shape, generator=g) < zeros, torch.zeros_like(mag), mag)


def _leaves(args: dict, grad_names, cast) -> dict:
    out = {}
    for name, v in args.items():
        if isinstance(v, Tensor) and v.is_floating_point():
            v = cast(v.detach()).clone()
            if name in grad_names:
                v.requires_grad_(True)
        out[name] = v
    return out


def _evaluate(fn, args: dict, grad_names, up: Tensor | None):
    out = fn(**args)
    inputs = [args[n] for n in grad_names]
    if not inputs:
        return out, []
    return out, list(torch.autograd.grad(out, inputs, up.to(out.dtype)))


#: Scalar parameters by name, and the logit multiplier each one means: Z = s_eff x . y (NCA and
#: uniformity: Z = 2 s x.y - s |y|^2, up to 3 s |x||y| in magnitude).
PARAMS = {
    "temperature": lambda v: 1.0 / v,
    "logit_scale": lambda v: v,
    "scale": lambda v: 3.0 * v,
    "t": lambda v: 3.0 * v,
}


def _magnitudes(args: dict) -> tuple[float, float, float | None]:
    """(logit multiplier s_eff, largest row norm of the features, the scalar parameter)."""
    s_eff, param = 1.0, None
    for name, to_scale in PARAMS.items():
        if name in args and args[name] is not None:
            param = float(torch.as_tensor(args[name]).detach().double())
            s_eff = to_scale(param)
    norms = [v.detach().double().flatten(0, -2).norm(dim=-1).max().item()
             for v in args.values() if isinstance(v, Tensor) and v.is_floating_point() and v.dim() >= 2]
    return abs(s_eff), max(norms, default=1.0), param


def check_loss(impl, ref, args: dict, grad_names, dtype: torch.dtype, *, accumulated: bool = True,
               normalized: bool = False, sum_over: int = 1, poison: bool = True, seed: int = 1234) -> Tensor:
    """Evaluate ``impl`` and ``ref`` on ``args`` (features already in ``dtype``; scalar
    parameters stay float32) with a random upstream gradient, and hold the loss and every
    gradient to the acceptance rules:

    * every 16-bit feature gradient: no worse than the reference evaluated in ``dtype``
      (|truth - out| <= |truth - torch_dtype| + about an ulp of the dtype);
    * float32 features, and (``accumulated``) the loss value and the gradients of scalar
      parameters for any dtype: no worse than the reference in float32 on the same rounded
      inputs + 2e-5 relative. ``accumulated=False`` for losses that round internally to the
      input dtype (normalised features): those are held to the dtype's rule.

    Values that cancel to ~0 from larger terms (saturated softmaxes, D = 1 with normalised
    rows, a tiny loss computed as r_i - S_ii) are held to the precision of those terms: an
    absolute floor of 8 float32 eps (``accumulated``; 0.1 ulp of the dtype otherwise) times the
    term's size: the logit magnitude L = s_eff max|x|^2 for the loss (times ``sum_over`` for a
    sum of that many terms), (1 + L) s_eff max|x| for a feature gradient (over the rows averaged
    when the loss is a mean; 1 + L because a softmax weight exp(Z - r) is off by eps |Z|
    relative), (1 + L) L / |parameter| for the scalar parameter (times sqrt(n) for n terms with
    random upstream signs). ``normalized``: the loss
    L2-normalises the rows, so the logits see unit rows (L = s_eff) and a feature gradient is
    divided by the row's norm (s_eff / min|x|).

    truth is the reference in float64 on the same rounded inputs. The implementation runs with
    its outputs poisoned with NaN. Returns the loss.
    """
    from csrc_triton._testing import poison_outputs

    truth_args = _leaves(args, grad_names, lambda v: v.double())
    with torch.no_grad():
        up = upstream(ref(**truth_args).shape, seed)
    truth, truth_grads = _evaluate(ref, truth_args, grad_names, up)
    low, low_grads = _evaluate(ref, _leaves(args, grad_names, lambda v: v), grad_names, up)
    if dtype != torch.float32:
        low32, low32_grads = _evaluate(ref, _leaves(args, grad_names, lambda v: v.float()), grad_names, up)
    else:
        low32, low32_grads = low, low_grads
    impl_args = _leaves(args, grad_names, lambda v: v)
    with poison_outputs(poison):
        out, out_grads = _evaluate(impl, impl_args, grad_names, up)

    assert out.dtype == accumulation_dtype(dtype), f"loss dtype {out.dtype} for {dtype} inputs"
    s_eff, norm, param = _magnitudes(args)
    features = [v for v in args.values() if isinstance(v, Tensor) and v.is_floating_point() and v.dim() >= 2]
    logits = s_eff * norm * norm
    grad_term = s_eff * norm
    if normalized:
        smallest = min(v.detach().double().flatten(0, -2).norm(dim=-1).min().item() for v in features)
        logits, grad_term = s_eff, s_eff / max(smallest, 1e-30)
    rows = features[0].flatten(0, -2).shape[0] if out.dim() == 0 and sum_over == 1 else 1
    if dtype == torch.float64:
        value_rule, grad_rule, k_value, k_grad = dtype, dtype, 8 * EPS[dtype], 8 * EPS[dtype]
    elif accumulated:
        value_rule, grad_rule, k_value, k_grad = torch.float32, dtype, 8 * EPS[torch.float32], 8 * EPS[torch.float32]
    else:
        value_rule, grad_rule, k_value, k_grad = dtype, dtype, 0.1 * RTOL[dtype], 0.1 * RTOL[dtype]
    value_low = low32 if value_rule == torch.float32 else low
    assert_no_worse_than_torch("loss", out, truth, value_low, value_rule, floor=k_value * logits * sum_over)
    for name, o, t, lo, lo32 in zip(grad_names, out_grads, truth_grads, low_grads, low32_grads):
        assert o is not None, f"no gradient for {name}"
        assert o.dtype == impl_args[name].dtype, f"grad of {name} has dtype {o.dtype}"
        label = f"d loss / d {name}"
        if name in PARAMS:  # a float32 (float64) accumulation, like the loss value
            # each loss term contributes about L / |p| (dL/ds = sum G q.k; dL/dt = -s^2 dL/ds),
            # with the softmax weights' relative error eps |Z| (the 1 + L); n terms with random
            # upstream signs add up like sqrt(n) (the parameter's gradient can be a small
            # difference of large per-row parts)
            n_terms = out.numel() if out.dim() else sum_over
            floor = (k_value * (1 + logits if accumulated else 1) * logits / max(abs(param), 1e-30)
                     * 1.5 * math.sqrt(n_terms))
            param_low = lo32 if value_rule == torch.float32 else lo
            assert_no_worse_than_torch(label, o, t, param_low, value_rule, floor=floor)
        else:
            # each softmax weight exp(Z - r) carries a relative error of the logits' absolute
            # error, eps |Z|: with float32 accumulation that is the floor's (1 + L) factor
            floor = k_grad * (1 + logits if accumulated else 1) * 1.5 * grad_term / rows
            assert_no_worse_than_torch(label, o, t, lo, grad_rule, floor=floor)
    return out
