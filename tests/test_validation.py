"""Bad input: the right exception type, and a message that names the offending argument.

Also: the mixed-precision case that must *not* raise, NaN inputs (NaN loss, no crash), and the
clear error of backend="triton" on CPU without Triton's interpreter.
"""
from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import csrc_triton

REPO = Path(__file__).resolve().parents[1]
N, D = 6, 8


def _x(n=N, d=D, dtype=torch.float32, device="cpu"):
    return torch.randn(n, d, dtype=dtype, device=device)


def _labels(n=N):
    return torch.tensor([0, 1, 0, 1, 2, 2][:n] + [3] * max(0, n - 6))


# Each case: (id, thunk, expected exception type(s), regex the message must match)
VALUE = ValueError
EITHER = (ValueError, TypeError)
BAD_SCALARS = [0.0, -1.0, math.inf, math.nan]


def _cases():
    c = []

    def add(name, thunk, exc, pattern):
        c.append(pytest.param(thunk, exc, pattern, id=name))

    # --- info_nce ---------------------------------------------------------------------------
    add("info_nce-D-mismatch", lambda: csrc_triton.info_nce(_x(), _x(d=D + 1)), VALUE, r"\bkey\b|\bquery\b")
    add("info_nce-N-mismatch", lambda: csrc_triton.info_nce(_x(), _x(n=N + 1)), VALUE, r"\bkey\b|\bquery\b")
    add("info_nce-empty", lambda: csrc_triton.info_nce(_x(n=0), _x(n=0)), VALUE, r"\bquery\b|\bkey\b")
    add("info_nce-query-1d", lambda: csrc_triton.info_nce(torch.randn(D), _x()), VALUE, r"\bquery\b")
    add("info_nce-queue-D", lambda: csrc_triton.info_nce(_x(), _x(), queue=_x(n=10, d=D + 2)), VALUE, r"\bqueue\b")
    add(
        "info_nce-queue-dtype",
        lambda: csrc_triton.info_nce(_x(), _x(), queue=_x(n=10, dtype=torch.bfloat16)),
        EITHER,
        r"\bqueue\b",
    )
    add(
        "info_nce-symmetric-with-queue",
        lambda: csrc_triton.info_nce(_x(), _x(), queue=_x(n=10), symmetric=True),
        VALUE,
        r"\bqueue\b|\bsymmetric\b",
    )
    for t in BAD_SCALARS:
        add(f"info_nce-temperature={t}", lambda t=t: csrc_triton.info_nce(_x(), _x(), temperature=t), VALUE, r"\btemperature\b")
    add("info_nce-reduction", lambda: csrc_triton.info_nce(_x(), _x(), reduction="avg"), VALUE, r"\breduction\b")
    add("info_nce-backend", lambda: csrc_triton.info_nce(_x(), _x(), backend="cuda-fast"), VALUE, r"\bbackend\b")
    add(
        "info_nce-dtype-mismatch",
        lambda: csrc_triton.info_nce(_x(), _x(dtype=torch.bfloat16)),
        EITHER,
        r"\bkey\b|\bquery\b",
    )
    add(
        "info_nce-device-mismatch",
        lambda: csrc_triton.info_nce(_x(), _x(device="meta")),
        EITHER,
        r"\bkey\b|\bquery\b",
    )

    # --- clip_loss ---------------------------------------------------------------------------
    s = lambda: torch.tensor(10.0)  # noqa: E731
    add("clip-D-mismatch", lambda: csrc_triton.clip_loss(_x(), _x(d=D + 1), s()), VALUE, r"image_features|text_features")
    add("clip-N-mismatch", lambda: csrc_triton.clip_loss(_x(), _x(n=N - 1), s()), VALUE, r"image_features|text_features")
    add("clip-empty", lambda: csrc_triton.clip_loss(_x(n=0), _x(n=0), s()), VALUE, r"image_features|text_features")
    for v in BAD_SCALARS:
        add(f"clip-logit_scale={v}", lambda v=v: csrc_triton.clip_loss(_x(), _x(), v), VALUE, r"\blogit_scale\b")
        add(
            f"clip-logit_scale-tensor={v}",
            lambda v=v: csrc_triton.clip_loss(_x(), _x(), torch.tensor(v)),
            VALUE,
            r"\blogit_scale\b",
        )
    add(
        "clip-dtype-mismatch",
        lambda: csrc_triton.clip_loss(_x(), _x(dtype=torch.bfloat16), s()),
        EITHER,
        r"image_features|text_features",
    )
    add(
        "clip-device-mismatch",
        lambda: csrc_triton.clip_loss(_x(device="meta"), _x(), s()),
        EITHER,
        r"image_features|text_features",
    )
    add("clip-backend", lambda: csrc_triton.clip_loss(_x(), _x(), s(), backend="gpu"), VALUE, r"\bbackend\b")

    # --- nt_xent -----------------------------------------------------------------------------
    add("nt_xent-N-mismatch", lambda: csrc_triton.nt_xent(_x(), _x(n=N + 2)), VALUE, r"\bz1\b|\bz2\b")
    add("nt_xent-D-mismatch", lambda: csrc_triton.nt_xent(_x(), _x(d=3)), VALUE, r"\bz1\b|\bz2\b")
    add("nt_xent-empty", lambda: csrc_triton.nt_xent(_x(n=0), _x(n=0)), VALUE, r"\bz1\b|\bz2\b")
    for t in BAD_SCALARS:
        add(f"nt_xent-temperature={t}", lambda t=t: csrc_triton.nt_xent(_x(), _x(), temperature=t), VALUE, r"\btemperature\b")
    add("nt_xent-reduction", lambda: csrc_triton.nt_xent(_x(), _x(), reduction="median"), VALUE, r"\breduction\b")
    add("nt_xent-backend", lambda: csrc_triton.nt_xent(_x(), _x(), backend="Triton!"), VALUE, r"\bbackend\b")
    add(
        "nt_xent-dtype-mismatch",
        lambda: csrc_triton.nt_xent(_x(dtype=torch.bfloat16), _x()),
        EITHER,
        r"\bz1\b|\bz2\b",
    )
    add("nt_xent-device-mismatch", lambda: csrc_triton.nt_xent(_x(), _x(device="meta")), EITHER, r"\bz1\b|\bz2\b")

    # --- supcon ------------------------------------------------------------------------------
    add("supcon-labels-too-long", lambda: csrc_triton.supcon(_x(), _labels(N + 1)), VALUE, r"\blabels\b")
    add("supcon-labels-2d", lambda: csrc_triton.supcon(_x(), _labels()[:, None]), VALUE, r"\blabels\b")
    add(
        "supcon-labels-per-view",
        lambda: csrc_triton.supcon(torch.randn(N, 2, D), _labels().repeat(2)),
        VALUE,
        r"\blabels\b",
    )
    add("supcon-labels-float", lambda: csrc_triton.supcon(_x(), _labels().float()), TypeError, r"\blabels\b")
    add("supcon-features-1d", lambda: csrc_triton.supcon(torch.randn(D), _labels()), VALUE, r"\bfeatures\b")
    add("supcon-features-4d", lambda: csrc_triton.supcon(torch.randn(N, 2, 2, D), _labels()), VALUE, r"\bfeatures\b")
    add("supcon-empty", lambda: csrc_triton.supcon(_x(n=0), _labels(0)), VALUE, r"\bfeatures\b|\blabels\b")
    add(
        "supcon-no-positive",
        lambda: csrc_triton.supcon(_x(), torch.arange(N)),
        VALUE,
        r"\blabels\b|positive",
    )
    for t in BAD_SCALARS:
        add(
            f"supcon-temperature={t}",
            lambda t=t: csrc_triton.supcon(_x(), _labels(), temperature=t),
            VALUE,
            r"\btemperature\b",
        )
    add("supcon-backend", lambda: csrc_triton.supcon(_x(), _labels(), backend=""), VALUE, r"\bbackend\b")
    add(
        "supcon-device-mismatch",
        lambda: csrc_triton.supcon(_x(device="meta"), _labels()),
        EITHER,
        r"\bfeatures\b|\blabels\b",
    )
    return c


@pytest.mark.parametrize("thunk,exc,pattern", _cases())
def test_bad_input(thunk, exc, pattern):
    with pytest.raises(exc) as info:
        thunk()
    msg = str(info.value)
    assert re.search(pattern, msg), f"message does not name the argument ({pattern}): {msg!r}"


@pytest.mark.parametrize("value", BAD_SCALARS)
@pytest.mark.parametrize("loss", ["info_nce", "nt_xent", "supcon"])
def test_bad_temperature_tensor(loss, value):
    """A temperature given as a tensor is checked like a float one."""
    t = torch.tensor(value)
    with pytest.raises(ValueError, match=r"\btemperature\b"):
        if loss == "info_nce":
            csrc_triton.info_nce(_x(), _x(), temperature=t)
        elif loss == "nt_xent":
            csrc_triton.nt_xent(_x(), _x(), temperature=t)
        else:
            csrc_triton.supcon(_x(), _labels(), temperature=t)


@pytest.mark.parametrize("module,args", [
    (lambda: csrc_triton.InfoNCELoss(temperature=-0.1), lambda: (_x(), _x())),
    (lambda: csrc_triton.NTXentLoss(temperature=0.0), lambda: (_x(), _x())),
    (lambda: csrc_triton.SupConLoss(temperature=math.inf), lambda: (_x(), _labels())),
    (lambda: csrc_triton.InfoNCELoss(reduction="avg"), lambda: (_x(), _x())),
])
def test_modules_validate_options(module, args):
    """A bad option fails at construction or at the first call, naming the option."""
    with pytest.raises(ValueError, match=r"temperature|reduction"):
        m = module()
        m(*args())


@pytest.mark.parametrize("backend", ["dense", "blockwise", "triton"])
def test_mixed_precision_scalars_are_accepted(backend):
    """bf16 features with a float32 temperature / logit_scale tensor is the normal AMP case."""
    a = _x(dtype=torch.bfloat16).requires_grad_()
    b = _x(dtype=torch.bfloat16).requires_grad_()
    t = torch.tensor(0.1, dtype=torch.float32, requires_grad=True)
    s = torch.tensor(10.0, dtype=torch.float32, requires_grad=True)
    losses = [
        csrc_triton.info_nce(a, b, temperature=t, backend=backend),
        csrc_triton.info_nce(a, b, temperature=t, queue=_x(n=9, dtype=torch.bfloat16), backend=backend),
        csrc_triton.clip_loss(a, b, s, backend=backend),
        csrc_triton.nt_xent(a, b, temperature=t, backend=backend),
        csrc_triton.supcon(torch.stack([a, b], 1), _labels(), temperature=t, backend=backend),
    ]
    total = sum(loss.float() for loss in losses)
    assert torch.isfinite(total)
    total.backward()
    assert t.grad is not None and t.grad.dtype == torch.float32 and torch.isfinite(t.grad)
    assert s.grad is not None and s.grad.dtype == torch.float32 and torch.isfinite(s.grad)
    assert a.grad.dtype == torch.bfloat16 and torch.isfinite(a.grad).all()


@pytest.mark.parametrize("backend", ["dense", "blockwise", "triton"])
@pytest.mark.parametrize("loss", ["info_nce", "moco", "clip_loss", "nt_xent", "supcon"])
def test_nan_input_gives_nan_loss(loss, backend):
    a, b = _x().requires_grad_(), _x()
    with torch.no_grad():
        a[2, 3] = float("nan")
    if loss == "info_nce":
        out = csrc_triton.info_nce(a, b, backend=backend)
    elif loss == "moco":
        out = csrc_triton.info_nce(a, b, queue=_x(n=9), in_batch_negatives=False, backend=backend)
    elif loss == "clip_loss":
        out = csrc_triton.clip_loss(a, b, torch.tensor(10.0), backend=backend)
    elif loss == "nt_xent":
        out = csrc_triton.nt_xent(a, b, backend=backend)
    else:
        out = csrc_triton.supcon(torch.stack([a, b], 1), _labels(), backend=backend)
    assert torch.isnan(out), f"loss {out.item()} with a NaN input"
    out.backward()  # no crash
    assert a.grad is not None


def test_triton_on_cpu_without_interpreter_fails_clearly():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = (
        "import torch, csrc_triton\n"
        "q = torch.randn(4, 8)\n"
        "try:\n"
        "    csrc_triton.info_nce(q, q, backend='triton')\n"
        "except Exception as e:\n"
        "    print('RAISED', type(e).__name__, str(e).replace(chr(10), ' '))\n"
        "else:\n"
        "    print('NO ERROR')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert "RAISED" in out, f"backend='triton' on CPU without TRITON_INTERPRET did not raise: {out!r}"
    assert "TRITON_INTERPRET" in out, f"error does not mention TRITON_INTERPRET: {out!r}"
