"""Backend selection, import hygiene (no triton at ``import edgelmm.kernels``; references work without
triton) and signature parity between each op's Triton wrapper and its reference."""

import inspect
import subprocess
import sys

import pytest
import torch

from edgelmm.errors import ConfigError
from edgelmm.kernels import KernelOps, load_ops
from edgelmm.kernels.dispatch import _OPS


def _run(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            check=False)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_import_does_not_import_triton():
    assert _run("import sys, edgelmm, edgelmm.kernels; print('triton' in sys.modules)") == "False"


def test_references_work_without_triton():
    """With triton unimportable, the torch backend and every reference still work; wrappers say why not."""
    code = """
import sys
sys.modules["triton"] = None  # makes `import triton` raise ImportError
import torch
from edgelmm.kernels import load_ops
from edgelmm.kernels.norms import rms_norm_triton
ops = load_ops("cpu")
x = torch.randn(2, 8)
out = ops.rms_norm(x, torch.ones(8), torch.empty_like(x), 1e-6)
print(ops.backend, torch.allclose(out, x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)))
try:
    rms_norm_triton(x, torch.ones(8), torch.empty_like(x), 1e-6)
except ModuleNotFoundError as e:
    print("triton is not installed" in str(e))
"""
    assert _run(code).split() == ["torch", "True", "True"]


@pytest.mark.parametrize("env,device,expected", [
    (None, "cpu", "torch"),
    ("torch", "cpu", "torch"),
    ("triton", "cpu", "triton"),  # allowed because conftest set TRITON_INTERPRET=1
    ("torch", "cuda", "torch"),
    ("reference", "cpu", "reference"),
])
def test_load_ops_backend(monkeypatch, env, device, expected):
    pytest.importorskip("triton")
    if env is None:
        monkeypatch.delenv("EDGELMM_KERNELS", raising=False)
    else:
        monkeypatch.setenv("EDGELMM_KERNELS", env)
    ops = load_ops(device)
    assert isinstance(ops, KernelOps) and ops.backend == expected
    suffix = {"triton": "_triton", "reference": "_ref", "torch": "_native"}[expected]
    for field, (module, stem) in _OPS.items():
        fn = getattr(ops, field)
        home = "native" if expected == "torch" else module
        assert fn.__name__ == stem + suffix and fn.__module__ == f"edgelmm.kernels.{home}"


def test_load_ops_default_is_triton_on_cuda(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.delenv("EDGELMM_KERNELS", raising=False)
    assert load_ops(torch.device("cuda", 0)).backend == "triton"


def test_load_ops_rejects_bad_overrides(monkeypatch):
    monkeypatch.setenv("EDGELMM_KERNELS", "cuda")
    with pytest.raises(ConfigError, match="EDGELMM_KERNELS"):
        load_ops("cpu")
    monkeypatch.setenv("EDGELMM_KERNELS", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ConfigError, match="TRITON_INTERPRET"):
        load_ops("cpu")


@pytest.mark.parametrize("field", list(_OPS))
def test_every_backend_has_the_same_signature(field):
    pytest.importorskip("triton")

    def params(backend):
        sig = inspect.signature(getattr(load_ops_for(backend), field))
        return [(p.name, p.kind, p.default) for p in sig.parameters.values()]

    assert params("triton") == params("reference") == params("torch")


def load_ops_for(backend: str) -> KernelOps:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EDGELMM_KERNELS", backend)
        return load_ops("cpu")
