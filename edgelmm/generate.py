"""Prefill, one-token decode and the generation loop as free functions over a VLM and its static cache."""
from __future__ import annotations

from collections.abc import Iterator

import torch

from .kv_cache import KVCache
from .models.vlm import VLM
from .sampling import SamplingParams, sample


@torch.inference_mode()
def prefill(model: VLM, embeds: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Run the prompt embeds [1, T, D] from position 0; return the next-token logits [V]."""
    return model.text(embeds, cache, start=0)[0, -1]


@torch.inference_mode()
def decode_one_token(model: VLM, token: int, position: int, cache: KVCache) -> torch.Tensor:
    """Feed one token at ``position``; return the next-token logits [V]."""
    ids = torch.tensor([[token]], device=cache.data.device)  # (1, 1)
    return model.text(model.text.embed(ids), cache, start=position)[0, -1]


def generate_ids(model: VLM, embeds: torch.Tensor, cache: KVCache, params: SamplingParams,
                 stop_ids: set[int]) -> Iterator[int]:
    """Yield generated token ids until a stop id (not yielded), ``max_new_tokens`` or the cache is full."""
    generator = params.generator()
    position = embeds.shape[1]
    logits = prefill(model, embeds, cache)
    for _ in range(params.max_new_tokens):
        token = sample(logits, params, generator)
        if token in stop_ids:
            return
        yield token
        if position >= cache.max_seq_len:
            return
        logits = decode_one_token(model, token, position, cache)
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
        safe = len(text)
        for s in self.stop:
            for n in range(min(len(s) - 1, safe), 0, -1):
                if text[:safe].endswith(s[:n]):
                    safe -= n
                    break
        return self._emit(text[:safe])

    def finish(self, text: str) -> str:
        """Flush what is left when generation ended without a stop string."""
        return "" if self.stopped else self._emit(text)

    def _emit(self, text: str) -> str:
        piece = text[self.emitted:]
        self.emitted = max(self.emitted, len(text))
        return piece
