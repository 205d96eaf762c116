"""The run-time sign of a damaged checkpoint that loads: NaN or infinite logits (NaN/inf weights, a
``rope_theta`` or norm eps that passes the config checks but still breaks the arithmetic). Torch-free: both
backends call it on each step's logits, which are already on the host."""
from __future__ import annotations

import numpy as np

from edgelmm.errors import NonFiniteLogitsError


def require_finite(logits: np.ndarray, step: str) -> np.ndarray:
    """Return ``logits`` [V]; raise NonFiniteLogitsError when any is NaN or infinite (``step``: "prefill" or
    "decode at position N", named in the message)."""
    finite = np.isfinite(logits)
    if not finite.all():
        bad = int(finite.size - np.count_nonzero(finite))
        raise NonFiniteLogitsError(
            f"the model computed {bad} NaN/infinite logits of {finite.size} at the {step}: its weights or config "
            "numbers are damaged (or fp16 overflows: try dtype='float32'); download or export the model again")
    return logits
