"""Bad input: the right exception type, raised before any backend work, with a message that names
the offending argument.

Also: the mixed-precision case that must *not* raise, backend resolution, and the clear error
of backend="triton" on CPU without Triton's interpreter.
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
from csrc_triton.ops import resolve_backend

REPO = Path(__file__).resolve().parents[1]
N, D = 6, 8


def _x(n=N, d=D, dtype=torch.float32, device="cpu"):
    return torch.randn(n, d, dtype=dtype, device=device)


def _labels(n=N):
    return torch.tensor([0, 1, 0, 1, 2, 2][:n] + [3] * max(0, n - 6))


VALUE = ValueError
TYPE = TypeError
BAD_SCALARS = [0.0, -1.0, math.inf, math.nan]


def _cases():
    c = []

    def add(name, thunk, exc, pattern):
        c.append(pytest.param(thunk, exc, pattern, id=name))

    def bad_scalars(prefix, arg, call):
        for v in BAD_SCALARS:
            add(f"{prefix}-{arg}={v}", lambda v=v: call(v), VALUE, rf"\b{arg}\b")
            add(f"{prefix}-{arg}-tensor={v}", lambda v=v: call(torch.tensor(v)), VALUE, rf"\b{arg}\b")
        add(f"{prefix}-{arg}-not-a-number", lambda: call("0.1"), TYPE, rf"\b{arg}\b")
        add(f"{prefix}-{arg}-vector", lambda: call(torch.tensor([0.1, 0.2])), VALUE, rf"\b{arg}\b")
        add(f"{prefix}-{arg}-integer-tensor", lambda: call(torch.tensor(2)), TYPE, rf"\b{arg}\b")

    # --- info_nce ---------------------------------------------------------------------------
    qk = r"\bkey\b|\bquery\b"
    add("info_nce-D-mismatch", lambda: csrc_triton.info_nce(_x(), _x(d=D + 1)), VALUE, qk)
    add("info_nce-N-mismatch", lambda: csrc_triton.info_nce(_x(), _x(n=N + 1)), VALUE, qk)
    add("info_nce-empty", lambda: csrc_triton.info_nce(_x(n=0), _x(n=0)), VALUE, qk)
    add("info_nce-D0", lambda: csrc_triton.info_nce(_x(d=0), _x(d=0)), VALUE, qk)
    add("info_nce-query-1d", lambda: csrc_triton.info_nce(torch.randn(D), _x()), VALUE, r"\bquery\b")
    add("info_nce-query-int", lambda: csrc_triton.info_nce(_x().long(), _x().long()), TYPE, r"\bquery\b")
    add("info_nce-query-list", lambda: csrc_triton.info_nce([[1.0]], _x()), TYPE, r"\bquery\b")
    add("info_nce-dtype-mismatch", lambda: csrc_triton.info_nce(_x(), _x(dtype=torch.bfloat16)), TYPE, qk)
    add("info_nce-device-mismatch", lambda: csrc_triton.info_nce(_x(), _x(device="meta")), VALUE, qk)
    add("info_nce-queue-D", lambda: csrc_triton.info_nce(_x(), _x(), queue=_x(n=10, d=D + 2)), VALUE, r"\bqueue\b")
    add("info_nce-queue-dtype", lambda: csrc_triton.info_nce(_x(), _x(), queue=_x(n=10, dtype=torch.bfloat16)),
        TYPE, r"\bqueue\b")
    add("info_nce-queue-device", lambda: csrc_triton.info_nce(_x(), _x(), queue=_x(n=10, device="meta")),
        VALUE, r"\bqueue\b")
    add("info_nce-symmetric-with-queue", lambda: csrc_triton.info_nce(_x(), _x(), queue=_x(n=10), symmetric=True),
        VALUE, r"\bsymmetric\b")
    add("info_nce-no-negatives", lambda: csrc_triton.info_nce(_x(), _x(), in_batch_negatives=False), VALUE,
        r"\bqueue\b|\bin_batch_negatives\b")
    bad_scalars("info_nce", "temperature", lambda t: csrc_triton.info_nce(_x(), _x(), temperature=t))
    add("info_nce-reduction", lambda: csrc_triton.info_nce(_x(), _x(), reduction="avg"), VALUE, r"\breduction\b")
    add("info_nce-backend", lambda: csrc_triton.info_nce(_x(), _x(), backend="cuda-fast"), VALUE, r"\bbackend\b")
    # 1 / 1e-6 = 1e6 is beyond float16's largest finite value (65504): the logits would overflow
    add("info_nce-fp16-temperature-reciprocal",
        lambda: csrc_triton.info_nce(_x(dtype=torch.float16), _x(dtype=torch.float16), temperature=1e-6),
        VALUE, r"\btemperature\b")
    add("info_nce-fp16-temperature-tensor-reciprocal",
        lambda: csrc_triton.info_nce(_x(dtype=torch.float16), _x(dtype=torch.float16),
                                     temperature=torch.tensor(1e-6)), VALUE, r"\btemperature\b")
    add("info_nce-process_group", lambda: csrc_triton.info_nce(_x(), _x(), process_group=object()), VALUE,
        r"\bprocess_group\b")

    # --- clip_loss ---------------------------------------------------------------------------
    it = r"image_features|text_features"
    s = lambda: torch.tensor(10.0)  # noqa: E731
    add("clip-D-mismatch", lambda: csrc_triton.clip_loss(_x(), _x(d=D + 1), s()), VALUE, it)
    add("clip-N-mismatch", lambda: csrc_triton.clip_loss(_x(), _x(n=N - 1), s()), VALUE, it)
    add("clip-empty", lambda: csrc_triton.clip_loss(_x(n=0), _x(n=0), s()), VALUE, it)
    add("clip-dtype-mismatch", lambda: csrc_triton.clip_loss(_x(), _x(dtype=torch.bfloat16), s()), TYPE, it)
    add("clip-device-mismatch", lambda: csrc_triton.clip_loss(_x(device="meta"), _x(), s()), VALUE, it)
    bad_scalars("clip", "logit_scale", lambda v: csrc_triton.clip_loss(_x(), _x(), v))
    add("clip-backend", lambda: csrc_triton.clip_loss(_x(), _x(), s(), backend="gpu"), VALUE, r"\bbackend\b")

    # --- nt_xent -----------------------------------------------------------------------------
    z = r"\bz1\b|\bz2\b"
    add("nt_xent-N-mismatch", lambda: csrc_triton.nt_xent(_x(), _x(n=N + 2)), VALUE, z)
    add("nt_xent-D-mismatch", lambda: csrc_triton.nt_xent(_x(), _x(d=3)), VALUE, z)
    add("nt_xent-empty", lambda: csrc_triton.nt_xent(_x(n=0), _x(n=0)), VALUE, z)
    add("nt_xent-dtype-mismatch", lambda: csrc_triton.nt_xent(_x(dtype=torch.bfloat16), _x()), TYPE, z)
    add("nt_xent-device-mismatch", lambda: csrc_triton.nt_xent(_x(), _x(device="meta")), VALUE, z)
    bad_scalars("nt_xent", "temperature", lambda t: csrc_triton.nt_xent(_x(), _x(), temperature=t))
    add("nt_xent-fp16-temperature-reciprocal",
        lambda: csrc_triton.nt_xent(_x(dtype=torch.float16), _x(dtype=torch.float16), temperature=1e-6),
        VALUE, r"\btemperature\b")
    add("nt_xent-reduction", lambda: csrc_triton.nt_xent(_x(), _x(), reduction="median"), VALUE, r"\breduction\b")
    add("nt_xent-backend", lambda: csrc_triton.nt_xent(_x(), _x(), backend="Triton!"), VALUE, r"\bbackend\b")

    # --- supcon ------------------------------------------------------------------------------
    add("supcon-labels-too-long", lambda: csrc_triton.supcon(_x(), _labels(N + 1)), VALUE, r"\blabels\b")
    add("supcon-labels-2d", lambda: csrc_triton.supcon(_x(), _labels()[:, None]), VALUE, r"\blabels\b")
    add("supcon-labels-per-view", lambda: csrc_triton.supcon(torch.randn(N, 2, D), _labels().repeat(2)), VALUE,
        r"\blabels\b")
    add("supcon-labels-float", lambda: csrc_triton.supcon(_x(), _labels().float()), TYPE, r"\blabels\b")
    add("supcon-labels-bool", lambda: csrc_triton.supcon(_x(), _labels() > 0), TYPE, r"\blabels\b")
    add("supcon-labels-list", lambda: csrc_triton.supcon(_x(), [0, 1, 0, 1, 2, 2]), TYPE, r"\blabels\b")
    add("supcon-labels-device", lambda: csrc_triton.supcon(_x(), _labels().to("meta")), VALUE, r"\blabels\b")
    add("supcon-features-1d", lambda: csrc_triton.supcon(torch.randn(D), _labels()), VALUE, r"\bfeatures\b")
    add("supcon-features-4d", lambda: csrc_triton.supcon(torch.randn(N, 2, 2, D), _labels()), VALUE,
        r"\bfeatures\b")
    add("supcon-empty", lambda: csrc_triton.supcon(_x(n=0), _labels(0)), VALUE, r"\bfeatures\b")
    add("supcon-no-positive", lambda: csrc_triton.supcon(_x(), torch.arange(N)), VALUE, r"\bpositive\b")
    bad_scalars("supcon", "temperature", lambda t: csrc_triton.supcon(_x(), _labels(), temperature=t))
    add("supcon-fp16-temperature-reciprocal",
        lambda: csrc_triton.supcon(_x(dtype=torch.float16), _labels(), temperature=1e-6), VALUE, r"\btemperature\b")
    add("supcon-backend", lambda: csrc_triton.supcon(_x(), _labels(), backend=""), VALUE, r"\bbackend\b")

    # --- nca ---------------------------------------------------------------------------------
    add("nca-embeddings-1d", lambda: csrc_triton.nca(torch.randn(D), _labels()), VALUE, r"\bembeddings\b")
    add("nca-embeddings-3d", lambda: csrc_triton.nca(torch.randn(N, 2, D), _labels()), VALUE, r"\bembeddings\b")
    add("nca-embeddings-int", lambda: csrc_triton.nca(_x().int(), _labels()), TYPE, r"\bembeddings\b")
    add("nca-empty", lambda: csrc_triton.nca(_x(n=0), _labels(0)), VALUE, r"\bembeddings\b")
    add("nca-labels-short", lambda: csrc_triton.nca(_x(), _labels(N - 1)), VALUE, r"\blabels\b")
    add("nca-labels-float", lambda: csrc_triton.nca(_x(), _labels().double()), TYPE, r"\blabels\b")
    add("nca-labels-device", lambda: csrc_triton.nca(_x(), _labels().to("meta")), VALUE, r"\blabels\b")
    add("nca-no-positive", lambda: csrc_triton.nca(_x(), torch.arange(N)), VALUE, r"\bpositive\b")
    bad_scalars("nca", "scale", lambda v: csrc_triton.nca(_x(), _labels(), scale=v))
    add("nca-reduction", lambda: csrc_triton.nca(_x(), _labels(), reduction="max"), VALUE, r"\breduction\b")
    add("nca-backend", lambda: csrc_triton.nca(_x(), _labels(), backend="fast"), VALUE, r"\bbackend\b")

    # --- n_pair ------------------------------------------------------------------------------
    ap = r"\banchors\b|\bpositives\b"
    add("n_pair-N-mismatch", lambda: csrc_triton.n_pair(_x(), _x(n=N + 1)), VALUE, ap)
    add("n_pair-D-mismatch", lambda: csrc_triton.n_pair(_x(), _x(d=D - 1)), VALUE, ap)
    add("n_pair-dtype-mismatch", lambda: csrc_triton.n_pair(_x(dtype=torch.float16), _x()), TYPE, ap)
    add("n_pair-device-mismatch", lambda: csrc_triton.n_pair(_x(), _x(device="meta")), VALUE, ap)
    add("n_pair-anchors-1d", lambda: csrc_triton.n_pair(torch.randn(D), _x()), VALUE, r"\banchors\b")
    for v in (-0.1, math.inf, math.nan):
        add(f"n_pair-l2_reg={v}", lambda v=v: csrc_triton.n_pair(_x(), _x(), l2_reg=v), VALUE, r"\bl2_reg\b")
    add("n_pair-l2_reg-str", lambda: csrc_triton.n_pair(_x(), _x(), l2_reg="0.1"), TYPE, r"\bl2_reg\b")
    add("n_pair-backend", lambda: csrc_triton.n_pair(_x(), _x(), backend="x"), VALUE, r"\bbackend\b")

    # --- uniformity --------------------------------------------------------------------------
    add("uniformity-1d", lambda: csrc_triton.uniformity(torch.randn(D)), VALUE, r"\bx\b")
    add("uniformity-one-row", lambda: csrc_triton.uniformity(_x(n=1)), VALUE, r"\bx\b")
    add("uniformity-int", lambda: csrc_triton.uniformity(_x().long()), TYPE, r"\bx\b")
    bad_scalars("uniformity", "t", lambda v: csrc_triton.uniformity(_x(), t=v))
    add("uniformity-backend", lambda: csrc_triton.uniformity(_x(), backend="?"), VALUE, r"\bbackend\b")
    return c


@pytest.fixture
def backends_untouched(monkeypatch):
    """Any call into a backend fails the test: validation must come before heavy work."""
    from csrc_triton import blockwise, dense

    def reached(*args, **kwargs):
        raise AssertionError("a backend ran before the arguments were validated")

    for module in (blockwise, dense):
        monkeypatch.setattr(module, "lse_forward", reached)
    yield


@pytest.mark.parametrize("thunk,exc,pattern", _cases())
def test_bad_input(thunk, exc, pattern, backends_untouched):
    with pytest.raises(exc) as info:
        thunk()
    msg = str(info.value)
    assert type(info.value) is exc, f"expected {exc.__name__}, got {type(info.value).__name__}: {msg}"
    assert re.search(pattern, msg), f"message does not name the argument ({pattern}): {msg!r}"


def test_bad_scalar_messages_give_the_value():
    """The message names the argument, its value and what was expected."""
    with pytest.raises(ValueError) as info:
        csrc_triton.info_nce(_x(), _x(), temperature=-0.5)
    assert "temperature" in str(info.value) and "-0.5" in str(info.value) and "positive" in str(info.value)
    with pytest.raises(ValueError) as info:
        csrc_triton.info_nce(_x(dtype=torch.float16), _x(dtype=torch.float16), temperature=1e-6)
    assert "1e-06" in str(info.value) and "float16" in str(info.value)
    with pytest.raises(ValueError) as info:
        csrc_triton.n_pair(_x(), _x(), l2_reg=-2.0)
    assert "l2_reg" in str(info.value) and "-2.0" in str(info.value)


def test_small_temperature_fine_where_the_reciprocal_fits():
    """The reciprocal check is per dtype: 1e-6 is fine for float32 and bfloat16 (largest ~3e38),
    and 2e-5 (reciprocal 5e4 < 65504) for float16."""
    for dtype, t in ((torch.float32, 1e-6), (torch.bfloat16, 1e-6), (torch.float16, 2e-5)):
        q = torch.nn.functional.normalize(_x(), dim=1).to(dtype)
        out = csrc_triton.info_nce(q, q, temperature=t, backend="blockwise")
        assert not torch.isnan(out)


@pytest.mark.parametrize("module,args", [
    (lambda: csrc_triton.InfoNCELoss(temperature=-0.1), lambda: (_x(), _x())),
    (lambda: csrc_triton.NTXentLoss(temperature=0.0), lambda: (_x(), _x())),
    (lambda: csrc_triton.SupConLoss(temperature=math.inf), lambda: (_x(), _labels())),
    (lambda: csrc_triton.InfoNCELoss(reduction="avg"), lambda: (_x(), _x())),
    (lambda: csrc_triton.NCALoss(scale=-1.0), lambda: (_x(), _labels())),
    (lambda: csrc_triton.NPairLoss(l2_reg=-1.0), lambda: (_x(), _x())),
    (lambda: csrc_triton.UniformityLoss(t=0.0), lambda: (_x(),)),
    (lambda: csrc_triton.ClipLoss(backend="tpu"), lambda: (_x(), _x(), 10.0)),
], ids=["info_nce-t", "nt_xent-t", "supcon-t", "info_nce-reduction", "nca-scale", "n_pair-l2_reg",
        "uniformity-t", "clip-backend"])
def test_modules_validate_options(module, args):
    """A bad option fails at construction or at the first call, naming the option."""
    with pytest.raises(ValueError, match=r"\btemperature\b|\breduction\b|\bscale\b|\bl2_reg\b|\bt\b|\bbackend\b"):
        m = module()
        m(*args())


# ----------------------------------------------------------------------------------------------
# Backend resolution
# ----------------------------------------------------------------------------------------------
def test_resolve_backend():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    # float64 is not a Triton dtype: "auto" on CUDA falls back to the blockwise backend
    assert resolve_backend("auto", cuda, torch.float64) == "blockwise"
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert resolve_backend("auto", cuda, dtype) == "triton"
        assert resolve_backend("auto", cpu, dtype) == "blockwise"
    assert resolve_backend("auto", cpu, torch.float64) == "blockwise"
    for name in ("blockwise", "dense"):
        assert resolve_backend(name, cuda, torch.float64) == name
    with pytest.raises(TypeError, match="float64"):
        resolve_backend("triton", cuda, torch.float64)
    with pytest.raises(ValueError, match=r"\bbackend\b"):
        resolve_backend("cuda", cpu, torch.float32)


def test_auto_float64_on_cpu_gives_float64():
    q = torch.randn(5, 3, dtype=torch.float64)
    for loss in (csrc_triton.info_nce(q, q.flip(0)), csrc_triton.uniformity(q)):
        assert loss.dtype == torch.float64


@pytest.mark.parametrize("backend", ["dense", "blockwise", "triton"])
def test_mixed_precision_scalars_are_accepted(backend):
    """bf16 features with a float32 temperature / logit_scale / scale / t tensor is the normal
    AMP case: no error, float32 gradients for the scalars, bf16 for the features."""
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
        csrc_triton.nca(a, _labels(), scale=s / 10, backend=backend),
        csrc_triton.n_pair(a, b, backend=backend),
        csrc_triton.uniformity(a, t=s / 5, backend=backend),
    ]
    for loss in losses:
        assert loss.dtype == torch.float32
    total = sum(losses)
    assert torch.isfinite(total)
    total.backward()
    assert t.grad is not None and t.grad.dtype == torch.float32 and torch.isfinite(t.grad)
    assert s.grad is not None and s.grad.dtype == torch.float32 and torch.isfinite(s.grad)
    assert a.grad.dtype == torch.bfloat16 and torch.isfinite(a.grad).all()


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
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert "RAISED" in out, f"backend='triton' on CPU without TRITON_INTERPRET did not raise: {out!r}"
    assert "TRITON_INTERPRET" in out, f"error does not mention TRITON_INTERPRET: {out!r}"
