"""One static, preallocated KV cache for all decoder layers."""
from __future__ import annotations

import math

import torch

DECODE_SPLIT = 256  # KV positions per split of the split-KV decode kernel
MAX_DECODE_SPLITS = 16


class KVCache:
    """Keys and values of every layer in one tensor of shape
    ``(2, num_layers, batch, num_kv_heads, max_seq_len, head_dim)``; layer ``i`` reads and writes the
    views ``data[0, i]`` / ``data[1, i]``. Allocated once when the model loads, never grown."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, max_seq_len: int,
                 batch: int = 1, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        self.max_seq_len = max_seq_len
        self.data = torch.zeros(2, num_layers, batch, num_kv_heads, max_seq_len, head_dim, dtype=dtype, device=device)
        self._workspace: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._step: tuple[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None

    def update(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k/v [B, Hkv, T, D] at positions start..start+T; return the layer's keys and values
        [B, Hkv, start+T, D] up to the last written position."""
        end = start + k.shape[2]
        self.data[0, layer, :, :, start:end] = k
        self.data[1, layer, :, :, start:end] = v
        return self.data[0, layer, :, :, :end], self.data[1, layer, :, :, :end]

    def keys(self, layer: int) -> torch.Tensor:
        """The layer's whole key buffer [B, Hkv, max_seq_len, D]."""
        return self.data[0, layer]

    def values(self, layer: int) -> torch.Tensor:
        """The layer's whole value buffer [B, Hkv, max_seq_len, D]."""
        return self.data[1, layer]

    def decode_workspace(self, num_heads: int, kv_len: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The split-KV decode kernel's buffers for a step over ``kv_len`` cached positions: ``part_out``
        fp32 [B, H, splits, D], ``part_lse`` fp32 [B, H, splits] and ``lens`` int32 [B] (= kv_len). Allocated
        on the first decode step, set up once per step and shared by every layer."""
        if self._step is not None and self._step[0] == kv_len:
            return self._step[1]
        if self._workspace is None:
            b, d, device = self.data.shape[2], self.data.shape[-1], self.data.device
            self._workspace = (torch.empty(b, num_heads, MAX_DECODE_SPLITS, d, device=device),  # (B, H, S, D)
                               torch.empty(b, num_heads, MAX_DECODE_SPLITS, device=device),  # (B, H, S)
                               torch.empty(b, dtype=torch.int32, device=device))  # (B,)
        part_out, part_lse, lens = self._workspace
        splits = min(MAX_DECODE_SPLITS, math.ceil(kv_len / DECODE_SPLIT))
        lens.fill_(kv_len)
        self._step = kv_len, (part_out[:, :, :splits], part_lse[:, :, :splits], lens)
        return self._step[1]

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()
