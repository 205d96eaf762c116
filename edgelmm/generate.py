"""The backend-independent generation loop and stop-string handling (no torch: the ONNX backend uses it)."""
from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import numpy as np

from edgelmm.sampling import SamplingParams, sample
from edgelmm.spec import ModelSpec


class Backend(Protocol):
    """What the generation loop needs from a runtime backend (torch, onnxruntime)."""

    spec: ModelSpec
    max_seq_len: int

    def encode_image(self, pixels: np.ndarray) -> object:
        """pixels [1, 3, S, S] float32 → the image features, kept in the backend's own tensor type."""

    def prefill(self, ids: list[int], features: object) -> np.ndarray:
        """Run the prompt (image positions marked) from position 0; return next-token logits [V]."""

    def decode(self, token: int, position: int) -> np.ndarray:
        """Feed one token at ``position``; return next-token logits [V]."""


def generate_ids(backend: Backend, ids: list[int], features: object, params: SamplingParams,
                 stop_ids: set[int]) -> Iterator[int]:
    """Yield generated token ids until a stop id (not yielded), ``max_new_tokens`` or the cache is full."""
    rng = params.rng()
    position = len(ids)
    logits = backend.prefill(ids, features)
    for _ in range(params.max_new_tokens):
        token = sample(logits, params, rng)
        if token in stop_ids:
            return
        yield token
        if position >= backend.max_seq_len:
            return
        logits = backend.decode(token, position)
        position += 1


class StopStringFilter:
    """Turns the growing decoded text into stream pieces: cuts at the first stop string and holds back any
    tail that could still become one."""

    def __init__(self, stop: tuple[str, ...]):
        self.stop = tuple(s for s in stop if s)
        self.emitted = 0
        self.stopped = False

    def push(self, text: str) -> str:
        """Given the full text so far, return the newly safe piece (and set ``stopped`` at a stop string)."""
        cuts = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if cuts:
            self.stopped = True
            return self._emit(text[:min(cuts)])
        held = max((n for s in self.stop for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
        return self._emit(text[:len(text) - held])

    def finish(self, text: str) -> str:
        """Flush what is left when generation ended without a stop string."""
        return "" if self.stopped else self._emit(text)

    def _emit(self, text: str) -> str:
        piece = text[self.emitted:]
        self.emitted = max(self.emitted, len(text))
        return piece
