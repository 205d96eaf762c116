"""Reading a .safetensors file with plain file reads, one tensor at a time.

The format: an 8-byte little-endian header length, a JSON header naming each tensor's dtype, shape and
byte range, then the raw little-endian data. ``safetensors.safe_open`` memory-maps the whole file, and every
page it touches counts towards the process's resident memory until the file is closed, so loading a shard
into fp32 parameters holds the shard's pages beside the parameters. Reading each tensor into its own buffer
keeps the peak at the parameters plus one tensor; the bytes still come from the page cache when the file is
warm.
"""
from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import torch

from edgelmm.checkpoint.json_file import json_type
from edgelmm.errors import CheckpointError

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
_MAX_HEADER = 100 << 20  # the format's own limit is 100 MB


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


class SafetensorsFile:
    """One .safetensors file: ``keys()``, ``shape(key)``, ``get(key)`` (a fresh tensor), ``close()``.
    Raises CheckpointError when the file is truncated or its header is damaged."""

    def __init__(self, path: Path):
        self.path = path
        self._file = open(path, "rb", buffering=0)  # noqa: SIM115 - closed by close()
        try:
            self._entries = self._read_header()
        except Exception:
            self._file.close()
            raise

    def _damaged(self, why: str) -> CheckpointError:
        return CheckpointError(f"{self.path} is truncated or corrupt ({why}); download it again")

    def _read_header(self) -> dict[str, tuple[torch.dtype, tuple[int, ...], int, int]]:
        size = self.path.stat().st_size
        head = self._file.read(8)
        if len(head) < 8:
            raise self._damaged("no header")
        (length,) = struct.unpack("<Q", head)
        if length > min(_MAX_HEADER, size - 8):
            raise self._damaged(f"header length {length} exceeds the file")
        try:
            header = json.loads(self._file.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise self._damaged(f"header is not JSON: {e}") from None
        if not isinstance(header, dict):
            raise self._damaged(f"header is a JSON {json_type(header)}, not an object")
        start, entries = 8 + length, {}
        for key, info in header.items():
            if key == "__metadata__":
                continue
            try:
                dtype, shape, (begin, end) = DTYPES[info["dtype"]], tuple(info["shape"]), info["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise self._damaged(f"bad header entry for {key}") from None
            if not all(_is_count(n) for n in (*shape, begin, end)):
                raise self._damaged(f"{key}'s shape or data_offsets are not non-negative integers")
            nbytes = dtype.itemsize * math.prod(shape)
            if not 0 <= begin <= end or end - begin != nbytes or start + end > size:
                raise self._damaged(f"{key}'s bytes lie outside the file")
            entries[key] = (dtype, shape, start + begin, nbytes)
        return entries

    def keys(self):
        return self._entries.keys()

    def _entry(self, key: str) -> tuple[torch.dtype, tuple[int, ...], int, int]:
        try:
            return self._entries[key]
        except KeyError:
            raise CheckpointError(f"{key} is not in {self.path} (an index or the file itself is damaged); "
                                  "download it again") from None

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entry(key)[1]

    def dtype(self, key: str) -> torch.dtype:
        return self._entry(key)[0]

    def get(self, key: str) -> torch.Tensor:
        """A new tensor holding ``key`` (CheckpointError when absent)."""
        dtype, shape, offset, nbytes = self._entry(key)
        out = torch.empty(shape, dtype=dtype)
        view = memoryview(out.reshape(-1).view(torch.uint8).numpy())  # the tensor's bytes, written in place
        self._file.seek(offset)
        done = 0
        while done < nbytes:
            got = self._file.readinto(view[done:])
            if not got:
                raise self._damaged(f"{key} ends early")
            done += got
        return out

    def close(self) -> None:
        self._file.close()
