"""Fused residual + RMSNorm / Gemma RMSNorm / LayerNorm: Triton (interpreter) and the torch reference vs
torch.nn.functional.rms_norm / layer_norm applied to the fp64 residual sum.

Tolerances: fp32 atol=rtol=1e-5; fp16 atol=rtol=4e-3 (fp16 output of values up to ~4; 1 ulp = 2e-3).
residual_out must equal x + residual rounded once to the input dtype.
"""

import pytest
import torch
import torch.nn.functional as F
from kernel_testutil import assert_close

from edgelmm.kernels.norms import layer_norm_ref, rms_norm_ref

triton = pytest.importorskip("triton")
from edgelmm.kernels.norms import layer_norm_triton, rms_norm_triton

TOL = {torch.float32: 1e-5, torch.float16: 4e-3}
EPS = 1e-6


def _oracle(kind, h, weight, bias):
    """Independent fp64 oracle on the residual sum h [..., N]."""
    if kind == "layer":
        return F.layer_norm(h, h.shape[-1:], weight.double(), bias.double(), EPS)
    w = weight.double() + (1.0 if kind == "gemma" else 0.0)
    return F.rms_norm(h, h.shape[-1:], eps=EPS) * w


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("kind", ["rms", "gemma", "layer"])
@pytest.mark.parametrize("shape", [(1, 64), (17, 1152), (2, 3, 2560), (1, 8192)])
def test_norm(shape, kind, with_residual, dtype):
    n = shape[-1]
    x = torch.randn(shape, dtype=dtype) * 2 + 0.5
    weight = torch.randn(n, dtype=dtype) * 0.5 + (0.0 if kind == "gemma" else 1.0)
    bias = torch.randn(n, dtype=dtype) * 0.1 if kind == "layer" else None
    residual = torch.randn(shape, dtype=dtype) if with_residual else None
    h = x.double() + (0 if residual is None else residual.double())
    expected = _oracle(kind, h, weight, bias)
    tol = TOL[dtype]
    for fn in ((layer_norm_triton, layer_norm_ref) if kind == "layer" else (rms_norm_triton, rms_norm_ref)):
        out = torch.full_like(x, float("nan"))
        residual_out = torch.full_like(x, float("nan")) if with_residual else None
        extra = {} if kind == "layer" else {"gemma": kind == "gemma"}
        args = (x, weight, bias, out, EPS) if kind == "layer" else (x, weight, out, EPS)
        fn(*args, residual=residual, residual_out=residual_out, **extra)
        assert_close(out, expected, atol=tol, rtol=tol)
        if with_residual:
            assert torch.equal(residual_out, h.to(dtype)), fn.__name__


def test_norm_residual_in_place_and_strided_rows():
    """residual_out may alias residual; rows may be strided (a slice of a wider buffer)."""
    wide = torch.randn(5, 2 * 1024, dtype=torch.float16)
    x = wide[:, :1024]  # row stride 2048
    residual = torch.randn(5, 1024, dtype=torch.float16)
    h = x.double() + residual.double()
    weight = torch.rand(1024, dtype=torch.float16) + 0.5
    out = torch.empty(5, 1024, dtype=torch.float16)
    rms_norm_triton(x, weight, out, EPS, residual=residual, residual_out=residual)
    assert torch.equal(residual, h.half())
    assert_close(out, _oracle("rms", h, weight, None), atol=TOL[torch.float16], rtol=TOL[torch.float16])


def test_norm_rejects_bad_arguments():
    x = torch.randn(3, 64)
    with pytest.raises(ValueError, match="weight dim 0"):
        rms_norm_triton(x, torch.ones(32), torch.empty_like(x), EPS)
    with pytest.raises(ValueError, match="together"):
        rms_norm_triton(x, torch.ones(64), torch.empty_like(x), EPS, residual=x)
    with pytest.raises(ValueError, match="at most 8192"):
        y = torch.randn(1, 8200)
        rms_norm_triton(y, torch.ones(8200), torch.empty_like(y), EPS)
    with pytest.raises(ValueError, match="needs a bias"):
        layer_norm_triton(x, torch.ones(64), None, torch.empty_like(x), EPS)
