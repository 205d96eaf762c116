"""One static, preallocated KV cache for all decoder layers."""
from __future__ import annotations

import torch


class KVCache:
    """Keys and values of every layer in one tensor of shape
    ``(2, num_layers, batch, num_kv_heads, max_seq_len, head_dim)``; layer ``i`` reads and writes the
    views ``data[0, i]`` / ``data[1, i]``. Allocated once when the model loads, never grown."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, max_seq_len: int,
                 batch: int = 1, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        self.max_seq_len = max_seq_len
        self.data = torch.zeros(2, num_layers, batch, num_kv_heads, max_seq_len, head_dim, dtype=dtype, device=device)

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

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()
