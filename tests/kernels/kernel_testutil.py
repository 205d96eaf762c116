"""Shared assertions for the kernel tests."""

import torch


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float,
                 min_cos: float = 1 - 1e-5):
    """allclose in fp64 plus a cosine-similarity floor (catches uniformly small but wrong outputs)."""
    a, e = actual.double().flatten(), expected.double().flatten()
    torch.testing.assert_close(a, e, atol=atol, rtol=rtol)
    if e.norm() > 0:
        cos = torch.nn.functional.cosine_similarity(a, e, dim=0).item()
        assert cos > min_cos, f"cosine similarity {cos} <= {min_cos}"
