"""Sampling parameters and next-token selection (numpy, so every backend shares it): greedy, temperature,
top-k, top-p, seeded."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from edgelmm.errors import ConfigError


@dataclass(slots=True)
class SamplingParams:
    """How to pick tokens. ``temperature=0`` (the default) is greedy; ``top_k=0`` and ``top_p=1`` disable
    those filters; generation ends at ``max_new_tokens``, a stop token id, or a stop string."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        self.max_new_tokens = _int("max_new_tokens", self.max_new_tokens, low=1)
        self.temperature = _real("temperature", self.temperature)
        if not self.temperature >= 0:
            raise ConfigError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        self.top_k = _int("top_k", self.top_k, low=0)
        self.top_p = _real("top_p", self.top_p)
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.seed is not None:
            self.seed = _int("seed", self.seed, low=0)
        self.stop = (self.stop,) if isinstance(self.stop, str) else _sequence("stop", self.stop)
        if not all(isinstance(s, str) and s for s in self.stop):
            raise ConfigError(f"stop must be a string or a sequence of non-empty strings, got {self.stop!r}")
        self.stop_token_ids = tuple(_int("stop_token_ids entry", i, low=0)
                                    for i in _sequence("stop_token_ids", self.stop_token_ids))

    def rng(self) -> np.random.Generator:
        return np.random.default_rng(self.seed)


def _sequence(name: str, value) -> tuple:
    """``value`` as a tuple; a non-iterable value raises ConfigError."""
    try:
        return tuple(value)
    except TypeError:
        raise ConfigError(f"{name} must be a sequence, got {value!r} ({type(value).__name__})") from None


def _int(name: str, value, low: int) -> int:
    """``value`` as an int of at least ``low`` (bools and floats are refused), else ConfigError."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ConfigError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    if value < low:
        raise ConfigError(f"{name} must be at least {low}, got {value}")
    return int(value)


def _real(name: str, value) -> float:
    """``value`` as a finite float (bools, strings, NaN and infinities are refused), else ConfigError."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ConfigError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    if not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number, got {value}")
    return float(value)


def sample(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    """Pick the next token id from logits [V]."""
    if params.temperature == 0:
        return int(np.argmax(logits))
    logits = logits.astype(np.float64) / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = np.partition(logits, -params.top_k)[-params.top_k]
        logits = np.where(logits < kth, -np.inf, logits)
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    if params.top_p < 1:
        order = np.argsort(-probs, kind="stable")
        sorted_probs = probs[order]
        keep = np.cumsum(sorted_probs) - sorted_probs < params.top_p  # always keeps the top token
        probs = np.zeros_like(probs)
        probs[order[keep]] = sorted_probs[keep]
        probs /= probs.sum()
    return int(rng.choice(probs.shape[-1], p=probs))
