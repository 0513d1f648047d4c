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

The loss of step k is the mean over its queries of -log softmax (summed over groups, divided
by the number of queries); the total is the mean over steps. Accuracy of step k: the fraction
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

    ``forward(predictions, z, lengths, speakers=None)``:
        predictions ``(K, B, S, C)`` from :meth:`cpc.model.CPCModel.predict`; z ``(B, S, C)``;
        lengths ``(B,)`` valid frames per sequence (None: all valid); speakers ``(B,)`` integer
        speaker ids, required for ``negatives="speaker"``; ``accuracy=False`` skips the
        accuracy (NaN in the output), for steps that do not log it.
    """

    def __init__(self, negatives: str = "batch", temperature: float = 1.0,
                 accuracy_rows: int = 256, backend: str = "auto",
                 similarity: str = "dot", process_group: object | None = None) -> None:
        super().__init__()
        if negatives not in NEGATIVE_MODES:
            raise ValueError(f"negatives={negatives!r}: expected one of {NEGATIVE_MODES}")
        if not temperature > 0:
            raise ValueError(f"temperature={temperature!r}: expected a positive number")
        if similarity not in ("dot", "cosine"):
            raise ValueError(f"similarity={similarity!r}: expected 'dot' or 'cosine'")
        if process_group is not None and not isinstance(process_group, dist.ProcessGroup):
            raise TypeError(f"process_group={process_group!r}: expected a "
                            "torch.distributed.ProcessGroup or None")
        self.negatives = negatives
        self.similarity = similarity
        self.temperature = float(temperature)
        self.accuracy_rows = int(accuracy_rows)
        self.backend = backend
        self.process_group = process_group

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
                accuracy: bool = True) -> CPCLossOutput:
        if predictions.dim() != 4 or z.dim() != 3 or predictions.shape[1:3] != z.shape[:2] \
                or predictions.shape[3] != z.shape[2]:
            raise ValueError(
                f"predictions.shape={tuple(predictions.shape)}, z.shape={tuple(z.shape)}: "
                "expected (K, B, S, C) and (B, S, C)"
            )
        steps, batch, frames, _ = predictions.shape
        device = z.device
        if self.similarity == "cosine":
            predictions = F.normalize(predictions, dim=-1)
            z = F.normalize(z, dim=-1)
        if lengths is None:
            lengths = torch.full((batch,), frames, dtype=torch.long, device=device)
        lengths = torch.as_tensor(lengths, device=device).long().clamp(max=frames)
        if self.negatives == "global":
            group = _default_group(self.process_group)
            if group is not None and dist.get_world_size(group) > 1:
                return self._forward_global(predictions, z, lengths, accuracy, group)
        groups = self._groups(batch, speakers, device)
        n_groups = int(groups.max()) + 1 if batch else 0

        step_losses, step_acc, step_n = [], [], []
        total = z.new_zeros(())
        for k in range(1, steps + 1):
            span = frames - k
            if span <= 0:
                step_losses.append(z.new_zeros(()))
                step_acc.append(z.new_zeros(()))
                step_n.append(0)
                continue
            t = torch.arange(span, device=device)
            valid = (t[None, :] + k) < lengths[:, None]  # (B, span)
            query_all = predictions[k - 1, :, :span]
            key_all = z[:, k:]
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
        loss = total / steps
        return CPCLossOutput(
            loss=loss,
            step_loss=torch.stack(step_losses).detach().float(),
            step_accuracy=torch.stack(step_acc).float(),
            step_queries=torch.tensor(step_n),
        )

    def _forward_global(self, predictions: torch.Tensor, z: torch.Tensor, lengths: torch.Tensor,
                        accuracy: bool, group: object) -> CPCLossOutput:
        """``negatives="global"`` over a group of R > 1 ranks (see the module docstring)."""
        from csrc_triton.distributed import gather_constant

        steps, _, frames, dim = predictions.shape
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
        counts = (lengths[None, :] - ks[:, None]).clamp(min=0).sum(1)
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
            span = frames - k
            valid = (torch.arange(span, device=device)[None, :] + k) < lengths[:, None]
            query = predictions[k - 1, :, :span][valid]
            key = z[:, k:][valid]
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
            loss=total / steps,
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
