"""bitsandbytes load-time quantization against independent references: the NF4 code book from the normal
quantiles (QLoRA), blockwise absmax in numpy, and the planner's bytes against the loaded layers' tensors."""
from __future__ import annotations

import importlib.util
from statistics import NormalDist

import numpy as np
import pytest

torch = pytest.importorskip("torch")
if importlib.util.find_spec("bitsandbytes") is None:
    pytest.skip("bitsandbytes is not installed (pip install edgelmm[bnb])", allow_module_level=True)

from edgelmm.api import EdgeLMM
from edgelmm.errors import ConfigError, MissingDependencyError
from edgelmm.plan.memory import bnb_linear_bytes


def nf4_codebook() -> np.ndarray:
    """QLoRA's NF4: 8 positive and 7 negative normal quantiles plus 0, scaled to [-1, 1]."""
    q = NormalDist().inv_cdf
    offset = 0.9677083
    pos = [q(p) for p in np.linspace(offset, 0.5, 9)[:-1]]
    neg = [-q(p) for p in np.linspace(offset, 0.5, 8)[:-1]]
    values = np.sort(np.array(pos + [0.0] + neg))
    return values / values.max()


def nf4_reference(w: np.ndarray, block: int = 64) -> np.ndarray:
    """Blockwise absmax NF4 round trip of ``w`` (row-major blocks of ``block`` weights)."""
    flat = w.reshape(-1, block)
    absmax = np.abs(flat).max(axis=1, keepdims=True)
    code = nf4_codebook()
    idx = np.abs(flat[..., None] / absmax[..., None] - code).argmin(-1)
    return (code[idx] * absmax).reshape(w.shape)


def test_bnb_nf4_matches_the_normal_quantile_codebook():
    import bitsandbytes as bnb

    w = torch.randn(96, 128, generator=torch.Generator().manual_seed(0))
    q, state = bnb.functional.quantize_4bit(w, blocksize=64, compress_statistics=False, quant_type="nf4")
    ours = bnb.functional.dequantize_4bit(q, state).numpy()
    np.testing.assert_allclose(state.code.numpy(), nf4_codebook(), atol=2e-4)
    ref = nf4_reference(w.numpy())
    assert np.mean(np.abs(ours - ref) < 1e-3) > 0.999  # ties at code midpoints may round either way


def test_loaded_nf4_linears_are_the_nf4_round_trip_of_the_checkpoint(tiny_checkpoint):
    import bitsandbytes as bnb

    folder = tiny_checkpoint("tinyllava")
    full = EdgeLMM.load(folder).backend.model
    quant = EdgeLMM.load(folder, quantize="nf4").backend.model
    layer = quant.text.layers[0].mlp.fc1
    assert isinstance(layer, bnb.nn.Linear4bit)
    got = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).numpy()
    w = full.text.layers[0].mlp.fc1.weight.detach().numpy()
    ref = nf4_reference(w)
    # double quantization stores absmax in 8 bits: within ~1% of each block's absmax of the plain round trip
    blocks = np.abs(w.reshape(-1, 64)).max(1, keepdims=True)
    assert np.max(np.abs(got - ref).reshape(-1, 64) / blocks) < 0.02
    assert np.abs(got - w).max() > 0  # it really is quantized
    assert type(quant.text.lm_head) is torch.nn.Linear  # the LM head and vision tower stay full precision
    assert type(quant.vision.layers[0].mlp.fc1) is torch.nn.Linear


def test_plan_counts_the_bytes_bitsandbytes_stores():
    import bitsandbytes as bnb

    w = torch.randn(300, 640)
    q, s = bnb.functional.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    stored = sum(t.numel() * t.element_size() for t in (q, s.absmax, s.code, s.state2.absmax, s.state2.code)) + 4
    assert bnb_linear_bytes(300, 640, "nf4") == stored
    cb, scb, _ = bnb.functional.int8_vectorwise_quant(w.half())
    assert bnb_linear_bytes(300, 640, "int8") == cb.numel() + scb.numel() * 4


def test_bad_quantize_and_missing_bitsandbytes_are_clear_errors(tiny_checkpoint, monkeypatch):
    import sys

    folder = tiny_checkpoint("tinyllava")
    with pytest.raises(ConfigError, match="nf4, fp4, int8"):
        EdgeLMM.load(folder, quantize="nf3")
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    monkeypatch.delitem(sys.modules, "edgelmm.models.bnb_linear", raising=False)
    monkeypatch.delattr(sys.modules["edgelmm.models"], "bnb_linear", raising=False)
    with pytest.raises(MissingDependencyError, match=r"pip install edgelmm\[bnb\]"):
        EdgeLMM.load(folder, quantize="nf4")
