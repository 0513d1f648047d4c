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

Padding: a frame at or beyond a sequence's valid length is neither a query nor a key. The
query at (b, t) for step k exists iff t + k < length_b; its positive z_{b,t+k} is then valid,
and the keys of a group are exactly the positives of its queries, so no padded frame ever
enters the loss.

Under DistributedDataParallel every process draws its negatives from its own batch (as
CPC_audio does); gradients are averaged across processes by DDP.

The loss of step k is the mean over its queries of -log softmax (summed over groups, divided
by the number of queries); the total is the mean over steps. Accuracy of step k: the fraction
of queries whose positive has the largest logit among its group's keys, estimated on at most
``accuracy_rows`` evenly spaced queries per step (no randomness, so it never touches the RNG).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

NEGATIVE_MODES = ("batch", "sequence", "speaker")


def _info_nce(query: torch.Tensor, key: torch.Tensor, temperature: float, backend: str):
    import csrc_triton  # the loss engine; imported lazily so the model imports without it

    return csrc_triton.info_nce(
        query, key, temperature=temperature, in_batch_negatives=True, reduction="sum",
        backend=backend,
    )


@dataclass
class CPCLossOutput:
    loss: torch.Tensor  # scalar, differentiable
    step_loss: torch.Tensor  # (K,), detached
    step_accuracy: torch.Tensor  # (K,), detached
    step_queries: torch.Tensor  # (K,) number of queries per step


class CPCCriterion(nn.Module):
    """InfoNCE per prediction step with selectable negatives.

    Args:
        negatives: ``"batch"``, ``"sequence"`` or ``"speaker"`` (see the module docstring).
        temperature: logits are ``query . key / temperature``; 1.0 is the paper (plain dot
            product).
        accuracy_rows: queries per step on which the accuracy is measured.
        backend: passed to ``csrc_triton.info_nce``.
        similarity: ``"dot"`` (the paper: logits are plain dot products) or ``"cosine"``
            (predictions and keys L2-normalised before the dot product, as in wav2vec 2.0;
            use with a temperature around 0.1). Cosine logits are bounded, so the encoder
            cannot lower the loss by inflating norms, and training on small CPU budgets is
            much steadier.

    ``forward(predictions, z, lengths, speakers=None)``:
        predictions ``(K, B, S, C)`` from :meth:`cpc.model.CPCModel.predict`; z ``(B, S, C)``;
        lengths ``(B,)`` valid frames per sequence (None: all valid); speakers ``(B,)`` integer
        speaker ids, required for ``negatives="speaker"``; ``accuracy=False`` skips the
        accuracy (NaN in the output), for steps that do not log it.
    """

    def __init__(self, negatives: str = "batch", temperature: float = 1.0,
                 accuracy_rows: int = 256, backend: str = "auto",
                 similarity: str = "dot") -> None:
        super().__init__()
        if negatives not in NEGATIVE_MODES:
            raise ValueError(f"negatives={negatives!r}: expected one of {NEGATIVE_MODES}")
        if not temperature > 0:
            raise ValueError(f"temperature={temperature!r}: expected a positive number")
        if similarity not in ("dot", "cosine"):
            raise ValueError(f"similarity={similarity!r}: expected 'dot' or 'cosine'")
        self.negatives = negatives
        self.similarity = similarity
        self.temperature = float(temperature)
        self.accuracy_rows = int(accuracy_rows)
        self.backend = backend

    def _groups(self, batch: int, speakers: torch.Tensor | None, device) -> torch.Tensor:
        """Group id of each sequence (B,)."""
        if self.negatives == "batch":
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
