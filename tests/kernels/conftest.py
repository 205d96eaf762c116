"""Kernel tests run Triton kernels on CPU tensors through Triton's interpreter.

TRITON_INTERPRET must be set before the op modules are imported (``@triton.jit`` picks the interpreter at
decoration time) and before triton itself is imported (its own jit helpers are decorated then), so it is
set here, at conftest import, ahead of every test module in this directory.
"""

import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")
if "triton" in sys.modules and os.environ["TRITON_INTERPRET"] == "1":
    import triton

    if not triton.knobs.runtime.interpret:
        raise RuntimeError("triton was imported before tests/kernels/conftest.py set TRITON_INTERPRET=1; "
                           "run the kernel tests on their own: pytest tests/kernels")

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)

