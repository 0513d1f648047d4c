"""The CPC objective: one InfoNCE term per prediction step, every term through
:func:`csrc_triton.info_nce`.

For step k (1..K) and frame t of sequence b, the query is the prediction W_k c_{b,t} and its
positive key is the encoded frame z_{b,t+k}. The negatives are the other keys of the same
*group*; which rows form a group is the negative-sampling choice of the paper's ablation
(Oord et al. 2018, table 2):

- ``"batch"``: one group per step, so the negatives of a query are z at all other positions of
  all sequences in the batch (the paper's "mixed speaker" setting, and the cheapest).
- ``"sequence"``: one group per sequence, so negatives come from other positions of the same
  sequence (the paper's "same sequence"; pushes features to encode local content rather than
  who speaks).
- ``"speaker"``: one group per speaker, so negatives come from the sequences of the same
  speaker (the paper's "same speaker"; CPC_audio's default ``samespeaker``).
- ``"global"``: ``"batch"`` over the batches of every process of a ``torch.distributed``
  group: the keys of every rank are gathered, with exact gradients, through
  ``csrc_triton.info_nce(..., process_group=...)`` (each rank computes only its own queries'
  strip of the logits). In one process (no group, or a group of one) it is ``"batch"``.

Padding: a frame at or beyond a sequence's valid length is neither a query nor a key. The
query at (b, t) for step k exists iff t + k < length_b; its positive z_{b,t+k} is then valid,
and the keys of a group are exactly the positives of its queries, so no padded frame ever
enters the loss.

Under DistributedDataParallel the first three modes draw each process's negatives from its own
batch (as CPC_audio does); gradients are averaged across processes by DDP.

Queries: the predictions may cover P <= S frames (the transformer predictor's W = S - K);
the query (b, t) of step k exists iff t < P and t + k < length_b.

Sampled negatives (``n_negatives=N > 0``, CPC_audio's ``negativeSamplingExt``): instead of
every key of the group, each query position (b, t) gets N negatives drawn once and shared by
every step (:func:`sample_negatives`: a sequence uniform in the query's group, then a time
uniform over that sequence's valid frames other than t, optionally never within
``exclude_near`` frames of a positive in the query's own sequence), and the logits of a query
are [positive, N negatives], as in CPC_audio's ``CPCUnsupersivedCriterion``. The draw uses the
``generator`` passed to ``forward`` (None: the default generator), so a recipe can make the
negatives of step s a function of (seed, step, rank). Not with ``"global"``.

Logits: ``q . k / temperature`` (``similarity="dot"``, the paper), ``q . k / (C temperature)``
(``"mean"``, CPC_audio's ``(prediction * candidate).mean(dim=3)``), or the cosine.

The loss of step k is the mean over its queries of -log softmax (summed over groups, divided
by the number of queries); the total is the mean over steps (``step_reduction="mean"``) or
their sum (``"sum"``, CPC_audio, whose effective learning rate on the predictions is then K
times larger). Accuracy of step k: the fraction
of queries whose positive has the largest logit among its group's keys, estimated on at most
``accuracy_rows`` evenly spaced queries per step (no randomness, so it never touches the RNG).

``"global"`` with R > 1 ranks follows the engine's convention (``csrc_triton.distributed``):
rank r returns, for each step k, R * (the sum of its queries' terms) / N_k, with N_k the number
of queries of step k over all ranks. So the mean of the ranks' losses is the loss of one
process on the concatenated batch, and DDP's average of the ranks' gradients is that loss's
gradient, exactly. Ranks may hold different numbers of valid frames (padding): each step is
padded to the largest rank's count with rows that are neither queries nor negatives (an extra
feature coordinate, 0 for real rows, puts the padded keys' logits below exp's range, see
:func:`_pad_rows`). The step accuracy and ``step_queries`` are those of the whole group (every
rank reports the same). Collectives per forward: one all-gather of the K step counts (read on
the host: the shapes depend on it) after one of (K, C) to check them, then per step the
engine's two, one all-reduce of the padding bound where padding is needed, and two more with
``accuracy=True`` (which must be the same on every rank, as must the number of calls).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

NEGATIVE_MODES = ("batch", "sequence", "speaker", "global")
SIMILARITIES = ("dot", "mean", "cosine")
STEP_REDUCTIONS = ("mean", "sum")


def sample_negatives(lengths: torch.Tensor, groups: torch.Tensor, queries: int,
                     n_negatives: int, steps: int, exclude_near: int | None = None,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw ``n_negatives`` negatives per query position, as CPC_audio's ``sampleClean`` does,
    restricted to the query's group and to valid frames.

    For each query position (b, t), t < ``queries``, and each j < n_negatives, independently:

    1. a sequence b' uniform among the sequences of b's group (``groups[b'] == groups[b]``)
       that have at least one valid frame (CPC_audio: any sequence of the batch, which with its
       ``samespeaker`` sampler is one speaker's);
    2. a time t' uniform over the allowed frames of b', ``0 <= t' < lengths[b']`` minus a
       forbidden interval: ``{t mod lengths[b']}`` (CPC_audio's ``(t + U[1, S)) mod S``, which
       never draws the query's own time), or, when ``exclude_near=E`` is given and b' == b,
       ``[min(t, t + 1 - E), t + steps + E]`` (never within E frames of any step's positive
       z_{b, t+1..t+steps}, and never t itself). t' is drawn directly from the allowed set
       (r uniform in [0, allowed), then shifted past the interval), with no redraw.

    (Positions t with t + 1 >= lengths[b] are never queries; their draws are valid frames
    but follow no rule.) The draw is shared by every step k (as in CPC_audio). If b' has no
    allowed frame (a
    sequence of one frame, or the query's own sequence shorter than the excluded interval) the
    negative is dropped: its time is -1 (the criterion gives it logit -inf).

    Args:
        lengths: ``(B,)`` valid frames per sequence.
        groups: ``(B,)`` integer group ids (equal ids: same group).
        queries: P, the query positions per sequence.
        n_negatives: N.
        steps: K, the prediction steps (for ``exclude_near``).
        exclude_near: E >= 0, or None (CPC_audio's rule only).
        generator: drives both draws (``torch.rand`` on ``lengths.device``); None: the default
            generator of that device.

    Returns:
        ``(B, P, N, 2)`` long: ``[..., 0]`` the sequence b', ``[..., 1]`` the time t' (-1:
        dropped). No host synchronisation.

    Example:
        >>> idx = sample_negatives(torch.tensor([50, 40]), torch.zeros(2, dtype=torch.long),
        ...                        queries=38, n_negatives=128, steps=12)
        >>> idx.shape
        torch.Size([2, 38, 128, 2])
    """
    if lengths.dim() != 1 or groups.shape != lengths.shape:
        raise ValueError(f"lengths.shape={tuple(lengths.shape)}, groups.shape="
                         f"{tuple(groups.shape)}: expected two (batch,) tensors")
    for name, value in (("queries", queries), ("n_negatives", n_negatives), ("steps", steps)):
        if not isinstance(value, int) or value < (0 if name == "queries" else 1):
            raise ValueError(f"{name}={value!r}: expected a positive integer")
    if exclude_near is not None and (not isinstance(exclude_near, int) or exclude_near < 0):
        raise ValueError(f"exclude_near={exclude_near!r}: expected None or an integer >= 0")
    device = lengths.device
    lengths = lengths.long()
    batch = lengths.shape[0]
    shape = (batch, queries, n_negatives)
    # 1. the sequence: the r-th member of b's group, r uniform in [0, members_b)
    member = (groups[:, None] == groups[None, :]) & (lengths[None, :] > 0)  # (B, B)
    count = member.sum(1).clamp(min=1)
    rank_end = member.long().cumsum(1)  # rank_end[b, j]: members among sequences 0..j
    u = torch.rand(shape, generator=generator, device=device, dtype=torch.float64)
    r = torch.minimum((u * count[:, None, None]).long(), (count - 1)[:, None, None])
    seq = torch.searchsorted(rank_end, (r + 1).view(batch, -1)).view(shape).clamp(max=batch - 1)
    # 2. the time: uniform over [0, L) minus the forbidden interval [lo, hi]
    length = lengths[seq]
    t = torch.arange(queries, device=device)[None, :, None].expand(shape)
    lo = hi = torch.remainder(t, length.clamp(min=1))
    if exclude_near is not None:
        own = seq == torch.arange(batch, device=device)[:, None, None]
        lo = torch.where(own, t - max(exclude_near - 1, 0), lo)
        hi = torch.where(own, t + steps + exclude_near, hi)
    lo = lo.clamp(min=0)
    hi = torch.minimum(hi, length - 1)
    width = (hi - lo + 1).clamp(min=0)
    allowed = length - width
    u = torch.rand(shape, generator=generator, device=device, dtype=torch.float64)
    r = torch.minimum((u * allowed).long(), allowed - 1)
    time = r + (r >= lo).long() * width
    time = torch.where(allowed > 0, time, torch.full_like(time, -1))
    return torch.stack([seq, time], dim=-1)


def _info_nce(query: torch.Tensor, key: torch.Tensor, temperature: float, backend: str,
              reduction: str = "sum", process_group: object | None = None):
    import csrc_triton  # the loss engine; imported lazily so the model imports without it

    return csrc_triton.info_nce(
        query, key, temperature=temperature, in_batch_negatives=True, reduction=reduction,
        backend=backend, process_group=process_group,
    )


def _default_group(process_group: object | None) -> object | None:
    """The group of ``negatives="global"``: the one given, else torch.distributed's default
    group when it is initialised with more than one rank, else None (one process)."""
    if process_group is not None:
        return process_group
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.group.WORLD
    return None


def _pad_rows(query: torch.Tensor, key: torch.Tensor, rows: int, bound: torch.Tensor,
              temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, C + 1) queries and keys: the n real rows with an extra coordinate, 1 for queries
    and 0 for keys, then rows - n padding rows, 0 but for the extra coordinate: 1 for queries,
    -c for keys.

    Real logits are unchanged (q.k + 1 * 0); a padded key's logit is -c / t for every query.
    With c = bound + 800 t, where bound >= max |q_i . k_j| over all ranks (detached), every
    real query's row log-sum-exp is at least its positive's logit >= -bound / t, so a padded
    key's softmax weight is at most exp(-800), which is 0 even in float64 (below 4.9e-324):
    the padded keys are not negatives and get no gradient. (c is capped at a quarter of the
    dtype's largest value: float16 with a temperature above about 20 would need more.) Padded
    queries' terms are dropped by the caller (upstream gradient 0)."""
    n = query.shape[0]
    cap = min(torch.finfo(query.dtype).max, torch.finfo(bound.dtype).max) / 4
    c = (bound + 800.0 * temperature).clamp(max=cap).to(query.dtype)
    extra_q = query.new_ones(rows, 1)
    extra_k = torch.cat([key.new_zeros(n, 1), (-c).expand(rows - n, 1)])
    q = torch.cat([F.pad(query, (0, 0, 0, rows - n)), extra_q], dim=1)
    k = torch.cat([F.pad(key, (0, 0, 0, rows - n)), extra_k], dim=1)
    return q, k


@dataclass
class CPCLossOutput:
    loss: torch.Tensor  # scalar, differentiable
    step_loss: torch.Tensor  # (K,), detached
    step_accuracy: torch.Tensor  # (K,), detached
    step_queries: torch.Tensor  # (K,) number of queries per step


class CPCCriterion(nn.Module):
    """InfoNCE per prediction step with selectable negatives.

    Args:
        negatives: ``"batch"``, ``"sequence"``, ``"speaker"`` or ``"global"`` (see the module
            docstring).
        temperature: logits are ``query . key / temperature``; 1.0 is the paper (plain dot
            product).
        accuracy_rows: queries per step on which the accuracy is measured.
        backend: passed to ``csrc_triton.info_nce``.
        similarity: ``"dot"`` (the paper: logits are plain dot products) or ``"cosine"``
            (predictions and keys L2-normalised before the dot product, as in wav2vec 2.0;
            use with a temperature around 0.1). Cosine logits are bounded, so the encoder
            cannot lower the loss by inflating norms, and training on small CPU budgets is
            much steadier.
        process_group: the ``torch.distributed`` group of ``negatives="global"``; None: the
            default group when torch.distributed is initialised, else one process (the same
            loss as ``"batch"``). Ignored by the other modes.

        n_negatives: 0 (every key of the group) or N > 0 sampled negatives per query (see the
            module docstring); not with ``"global"``.
        exclude_near: with N > 0, E >= 0: negatives from the query's own sequence never within
            E frames of a positive (nor at t); None: CPC_audio's rule only (never at t).
        step_reduction: ``"mean"`` or ``"sum"`` (CPC_audio) of the K step losses.

    ``forward(predictions, z, lengths, speakers=None, accuracy=True, generator=None)``:
        predictions ``(K, B, P, C)``, P <= S, from :meth:`cpc.model.CPCModel.predict`;
        z ``(B, S, C)``;
        lengths ``(B,)`` valid frames per sequence (None: all valid); speakers ``(B,)`` integer
        speaker ids, required for ``negatives="speaker"``; ``accuracy=False`` skips the
        accuracy (NaN in the output), for steps that do not log it; ``generator`` drives the
        draw of sampled negatives (on z's device). With N > 0 the accuracy counts a query as
        right when its positive's logit is strictly above every negative's (ties are wrong),
        and ``step_queries`` stays on z's device (no host synchronisation unless accuracy).

    Example:
        >>> crit = CPCCriterion("speaker", similarity="mean", n_negatives=128,
        ...                     step_reduction="sum")  # CPC_audio's objective
        >>> out = crit(model.predict(c), z, lengths, speakers,
        ...            generator=torch.Generator().manual_seed(step))
    """

    def __init__(self, negatives: str = "batch", temperature: float = 1.0,
                 accuracy_rows: int = 256, backend: str = "auto",
                 similarity: str = "dot", process_group: object | None = None,
                 n_negatives: int = 0, exclude_near: int | None = None,
                 step_reduction: str = "mean") -> None:
        super().__init__()
        if negatives not in NEGATIVE_MODES:
            raise ValueError(f"negatives={negatives!r}: expected one of {NEGATIVE_MODES}")
        if not temperature > 0:
            raise ValueError(f"temperature={temperature!r}: expected a positive number")
        if similarity not in SIMILARITIES:
            raise ValueError(f"similarity={similarity!r}: expected one of {SIMILARITIES}")
        if process_group is not None and not isinstance(process_group, dist.ProcessGroup):
            raise TypeError(f"process_group={process_group!r}: expected a "
                            "torch.distributed.ProcessGroup or None")
        if not isinstance(n_negatives, int) or isinstance(n_negatives, bool) or n_negatives < 0:
            raise ValueError(f"n_negatives={n_negatives!r}: expected an integer >= 0 (0: every "
                             "frame of the group's pool)")
        if exclude_near is not None and (not isinstance(exclude_near, int)
                                         or isinstance(exclude_near, bool) or exclude_near < 0):
            raise ValueError(f"exclude_near={exclude_near!r}: expected None or an integer >= 0")
        if exclude_near is not None and n_negatives == 0:
            raise ValueError(f"exclude_near={exclude_near!r}: only with sampled negatives "
                             "(n_negatives > 0); got n_negatives=0")
        if negatives == "global" and n_negatives > 0:
            raise ValueError(f"n_negatives={n_negatives}: sampled negatives are not supported "
                             "with negatives='global' (cross-rank negatives use every frame of "
                             "every rank); use n_negatives=0 or another negatives mode")
        if step_reduction not in STEP_REDUCTIONS:
            raise ValueError(f"step_reduction={step_reduction!r}: expected one of "
                             f"{STEP_REDUCTIONS}")
        self.negatives = negatives
        self.similarity = similarity
        self.temperature = float(temperature)
        self.accuracy_rows = int(accuracy_rows)
        self.backend = backend
        self.process_group = process_group
        self.n_negatives = n_negatives
        self.exclude_near = exclude_near
        self.step_reduction = step_reduction

    def _groups(self, batch: int, speakers: torch.Tensor | None, device) -> torch.Tensor:
        """Group id of each sequence (B,)."""
        if self.negatives in ("batch", "global"):  # "global" in one process is "batch"
            return torch.zeros(batch, dtype=torch.long, device=device)
        if self.negatives == "sequence":
            return torch.arange(batch, device=device)
        if speakers is None:
            raise ValueError("speakers=None: negatives='speaker' needs a (batch,) speaker id tensor")
        speakers = torch.as_tensor(speakers, device=device).long()
        if speakers.shape != (batch,):
            raise ValueError(f"speakers.shape={tuple(speakers.shape)}: expected ({batch},)")
        return torch.unique(speakers, return_inverse=True)[1]

    def forward(self, predictions: torch.Tensor, z: torch.Tensor,
                lengths: torch.Tensor | None = None,
                speakers: torch.Tensor | None = None,
                accuracy: bool = True,
                generator: torch.Generator | None = None) -> CPCLossOutput:
        if predictions.dim() != 4 or z.dim() != 3 or predictions.shape[1] != z.shape[0] \
                or predictions.shape[2] > z.shape[1] or predictions.shape[3] != z.shape[2]:
            raise ValueError(
                f"predictions.shape={tuple(predictions.shape)}, z.shape={tuple(z.shape)}: "
                "expected (K, B, P, C) and (B, S, C) with P <= S"
            )
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator={generator!r}: expected a torch.Generator or None")
        steps, batch, _, dim = predictions.shape
        frames = z.shape[1]
        device = z.device
        if self.similarity == "cosine":
            predictions = F.normalize(predictions, dim=-1)
            z = F.normalize(z, dim=-1)
        elif self.similarity == "mean":  # CPC_audio's (prediction * candidate).mean(dim=3)
            predictions = predictions / dim
        if lengths is None:
            lengths = torch.full((batch,), frames, dtype=torch.long, device=device)
        lengths = torch.as_tensor(lengths, device=device).long().clamp(max=frames)
        if self.n_negatives > 0:
            groups = self._groups(batch, speakers, device)
            return self._forward_sampled(predictions, z, lengths, groups, accuracy, generator)
        if self.negatives == "global":
            group = _default_group(self.process_group)
            if group is not None and dist.get_world_size(group) > 1:
                return self._forward_global(predictions, z, lengths, accuracy, group)
        groups = self._groups(batch, speakers, device)
        n_groups = int(groups.max()) + 1 if batch else 0

        step_losses, step_acc, step_n = [], [], []
        total = z.new_zeros(())
        for k in range(1, steps + 1):
            span = min(predictions.shape[2], frames - k)  # queries t < P with t + k < S
            if span <= 0:
                step_losses.append(z.new_zeros(()))
                step_acc.append(z.new_zeros(()))
                step_n.append(0)
                continue
            t = torch.arange(span, device=device)
            valid = (t[None, :] + k) < lengths[:, None]  # (B, span)
            query_all = predictions[k - 1, :, :span]
            key_all = z[:, k:k + span]
            row_group = groups[:, None].expand(batch, span)[valid]
            query = query_all[valid]
            key = key_all[valid]
            n = query.shape[0]
            if n == 0:
                step_losses.append(z.new_zeros(()))
                step_acc.append(z.new_zeros(()))
                step_n.append(0)
                continue
            loss_sum = z.new_zeros(())
            correct, counted = 0, 0
            for g in range(n_groups):
                rows = (row_group == g).nonzero(as_tuple=True)[0] if n_groups > 1 else None
                qg = query if rows is None else query[rows]
                kg = key if rows is None else key[rows]
                m = qg.shape[0]
                if m == 0:
                    continue
                loss_sum = loss_sum + _info_nce(qg, kg, self.temperature, self.backend)
                if accuracy:
                    c, cnt = self._accuracy(qg, kg, n)
                    correct += c
                    counted += cnt
            step_loss = loss_sum / n
            total = total + step_loss
            step_losses.append(step_loss.detach())
            step_acc.append(torch.tensor(correct / counted if counted else float("nan"),
                                         device=device))
            step_n.append(n)
        loss = self._reduce_steps(total, steps)
        return CPCLossOutput(
            loss=loss,
            step_loss=torch.stack(step_losses).detach().float(),
            step_accuracy=torch.stack(step_acc).float(),
            step_queries=torch.tensor(step_n),
        )

    def _reduce_steps(self, total: torch.Tensor, steps: int) -> torch.Tensor:
        """The sum of the K step losses (CPC_audio) or their mean."""
        return total if self.step_reduction == "sum" else total / steps

    def _forward_sampled(self, predictions: torch.Tensor, z: torch.Tensor, lengths: torch.Tensor,
                         groups: torch.Tensor, accuracy: bool,
                         generator: torch.Generator | None) -> CPCLossOutput:
        """``n_negatives > 0``: per query, [positive, N sampled negatives], cross-entropy.

        The loss of step k is the mean over its queries (t < P, t + k < length_b) of
        ``-log softmax(l)_0`` with ``l = [q . z_{b,t+k}, q . z_{b',t'} ...] / temperature``
        (dropped negatives: -inf). Every step at once: the negatives of (b, t) are shared by
        the K steps, so their logits are one batched product ``(K, C) x (C, N)`` per (b, t)
        (the negatives read once, and their gradient formed once). Masked sums rather than
        boolean indexing, so no host synchronisation unless ``accuracy=True``.
        """
        steps, batch, pframes, _ = predictions.shape
        frames = z.shape[1]
        device = z.device
        idx = sample_negatives(lengths, groups, pframes, self.n_negatives, steps,
                               self.exclude_near, generator)
        seq, time = idx.unbind(-1)  # (B, P, N)
        dropped = time < 0
        # float32 accumulation for 16-bit inputs (float64 stays float64): the products and the
        # log-softmax in acc_dtype, the gradients cast back once
        acc_dtype = torch.float64 if z.dtype == torch.float64 else torch.float32
        z = z.to(acc_dtype)
        # index_select (its backward is an index_add, several times faster on CPU than the
        # accumulating index_put of advanced indexing)
        flat = (seq * frames + time.clamp(min=0)).view(-1)
        negatives = z.reshape(batch * frames, -1).index_select(0, flat).view(
            *seq.shape, z.shape[2])  # (B, P, N, C)
        query = predictions.to(acc_dtype).permute(1, 2, 0, 3)  # (B, P, K, C)
        t = torch.arange(pframes, device=device)
        ks = torch.arange(1, steps + 1, device=device)
        target = t[:, None] + ks[None, :]  # (P, K): the positive's frame t + k
        valid = target[None] < lengths[:, None, None]  # (B, P, K); lengths <= S
        positives = z.index_select(1, target.clamp(max=frames - 1).view(-1)).view(
            batch, pframes, steps, z.shape[2])  # (B, P, K, C); invalid ones unused
        logits = torch.cat([(query * positives).sum(-1, keepdim=True),
                            query @ negatives.transpose(2, 3)], dim=-1) / self.temperature
        logits = logits.masked_fill(F.pad(dropped, (1, 0))[:, :, None, :], float("-inf"))
        terms = -torch.log_softmax(logits, dim=-1)[..., 0]  # (B, P, K)
        n = valid.sum((0, 1))  # (K,)
        step_loss = torch.where(valid, terms, torch.zeros_like(terms)).sum((0, 1)) \
            / n.clamp(min=1)
        if accuracy:
            # a negative that is the positive's own frame (b' = b, t' = t + k) ties with it
            # exactly, whatever the rounding of the two products
            own = seq == torch.arange(batch, device=device)[:, None, None]
            offset = torch.where(own, time - t[None, :, None], torch.zeros_like(time))
            tie = (offset[..., None] == ks).any(2)  # (B, P, K)
            step_acc = [self._accuracy_sampled(logits[:, :, k].detach(), valid[:, :, k],
                                               tie[:, :, k]) for k in range(steps)]
        else:
            step_acc = [logits.new_full((), float("nan"))] * steps
        return CPCLossOutput(
            loss=self._reduce_steps(step_loss.sum(), steps),  # float32 for 16-bit inputs
            step_loss=step_loss.detach().float(),
            step_accuracy=torch.stack(step_acc).float(),
            step_queries=n,  # on z's device: no host synchronisation
        )

    @torch.no_grad()
    def _accuracy_sampled(self, logits: torch.Tensor, valid: torch.Tensor,
                          tie: torch.Tensor) -> torch.Tensor:
        """Fraction of about accuracy_rows evenly spaced valid queries whose positive logit is
        strictly above every negative's (ties count as wrong; ``tie``: a negative is the
        positive's frame)."""
        correct = (logits[..., 0] > logits[..., 1:].amax(dim=-1)) & ~tie  # (B, P)
        correct = correct[valid]  # query order: b, then t (host sync: logging steps only)
        m = correct.numel()
        if m == 0:
            return logits.new_full((), float("nan"))
        want = min(m, max(1, self.accuracy_rows))
        rows = torch.linspace(0, m - 1, want, device=logits.device).round().long()
        return correct[rows].float().mean()

    def _forward_global(self, predictions: torch.Tensor, z: torch.Tensor, lengths: torch.Tensor,
                        accuracy: bool, group: object) -> CPCLossOutput:
        """``negatives="global"`` over a group of R > 1 ranks (see the module docstring)."""
        from csrc_triton.distributed import gather_constant

        steps, _, pframes, dim = predictions.shape
        frames = z.shape[1]
        device = z.device
        rank, size = dist.get_rank(group), dist.get_world_size(group)
        # every rank must run the same steps on the same feature size (the batch and the
        # sequence length may differ): checked first, so that a mismatch raises on every rank
        # instead of desynchronising the collectives below
        shapes = gather_constant(torch.tensor([[steps, dim]], device=device), group).tolist()
        if any(s != shapes[0] for s in shapes):
            raise ValueError(
                f"predictions.shape={tuple(predictions.shape)} on rank {rank}: negatives='global' "
                "needs the same number of steps K and features C on every rank; got (K, C) = "
                f"{[tuple(s) for s in shapes]} (rank order)")
        # valid queries of step k on this rank: sum_b max(0, length_b - k); the table of every
        # rank's counts is read on the host once, since the padded shapes depend on it
        ks = torch.arange(1, steps + 1, device=device)
        # (queries t < min(P, length_b - k))
        counts = torch.minimum(lengths[None, :] - ks[:, None],
                               torch.full_like(lengths[None, :], pframes)).clamp(min=0).sum(1)
        table = gather_constant(counts[None], group).tolist()  # (R, K)
        step_losses, step_acc, step_n = [], [], []
        total = z.new_zeros(())
        for k in range(1, steps + 1):
            n_all = [row[k - 1] for row in table]
            n_total, n_max, n = sum(n_all), max(n_all), n_all[rank]
            step_n.append(n_total)
            if n_total == 0:  # the same decision on every rank: no collective is skipped alone
                step_losses.append(z.new_zeros(()))
                step_acc.append(z.new_zeros(()))
                continue
            span = max(min(pframes, frames - k), 0)
            valid = (torch.arange(span, device=device)[None, :] + k) < lengths[:, None]
            query = predictions[k - 1, :, :span][valid]
            key = z[:, k:k + span][valid]
            if min(n_all) < n_max:
                # max |q_i . k_j| over the group <= max |q_i| * max |k_j| (Cauchy-Schwarz)
                acc = torch.float64 if z.dtype == torch.float64 else torch.float32
                zero = z.new_zeros((), dtype=acc)
                norms = torch.stack([query.detach().to(acc).norm(dim=1).max() if n else zero,
                                     key.detach().to(acc).norm(dim=1).max() if n else zero])
                dist.all_reduce(norms, op=dist.ReduceOp.MAX, group=group)
                q, kk = _pad_rows(query, key, n_max, norms[0] * norms[1], self.temperature)
            else:
                q, kk = query, key
            per_query = _info_nce(q, kk, self.temperature, self.backend, reduction="none",
                                  process_group=group)
            # the convention: R * (this rank's terms) / (the group's number of queries)
            step_loss = per_query[:n].sum() * (size / n_total)
            total = total + step_loss
            step_losses.append(step_loss.detach())
            step_acc.append(self._accuracy_global(query, key, n_all, rank, group, device)
                            if accuracy else torch.tensor(float("nan"), device=device))
        return CPCLossOutput(
            loss=self._reduce_steps(total, steps),
            step_loss=torch.stack(step_losses).detach().float(),
            step_accuracy=torch.stack(step_acc).float(),
            step_queries=torch.tensor(step_n),
        )

    @torch.no_grad()
    def _accuracy_global(self, query: torch.Tensor, key: torch.Tensor, n_all: list[int], rank: int,
                         group: object, device) -> torch.Tensor:
        """The group's accuracy of one step, on about accuracy_rows queries in all: each rank
        ranks its evenly spaced rows against every rank's keys (padding masked out)."""
        from csrc_triton.distributed import gather_constant

        n, n_max, n_total = n_all[rank], max(n_all), sum(n_all)
        keys = gather_constant(F.pad(key.detach().float(), (0, 0, 0, n_max - n)), group)
        real = torch.tensor([j < m for m in n_all for j in range(n_max)], device=device)
        want = min(n, max(1, round(self.accuracy_rows * n / n_total)))
        rows = torch.linspace(0, n - 1, want, device=device).round().long()  # empty if n == 0
        logits = (query[rows].float() @ keys.T).masked_fill(~real, float("-inf"))
        correct = (logits.argmax(dim=1) == rows + rank * n_max).sum()
        # every rank with a query counts at least one, so the group's count is positive
        stats = torch.stack([correct.to(torch.float64), correct.new_tensor(want, dtype=torch.float64)])
        dist.all_reduce(stats, group=group)
        return (stats[0] / stats[1]).float()

    @torch.no_grad()
    def _accuracy(self, qg: torch.Tensor, kg: torch.Tensor, n_step: int) -> tuple[int, int]:
        """(correct, counted) on about accuracy_rows * |group| / n_step evenly spaced rows."""
        m = qg.shape[0]
        want = max(1, round(self.accuracy_rows * m / n_step))
        if want >= m:
            rows = torch.arange(m, device=qg.device)
        else:
            rows = torch.linspace(0, m - 1, want, device=qg.device).round().long()
        logits = qg[rows].float() @ kg.float().T
        return int((logits.argmax(dim=1) == rows).sum()), int(rows.numel())
