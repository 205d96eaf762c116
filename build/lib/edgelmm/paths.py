"""Where edgelmm keeps what it makes once and reuses: ``$EDGELMM_CACHE``, else ``~/.cache/edgelmm``."""
from __future__ import annotations

import os
from pathlib import Path


def cache_root(path: str | Path | None = None) -> Path:
    """``path`` if given, else ``$EDGELMM_CACHE``, else ``~/.cache/edgelmm`` (not created here)."""
    return Path(path or os.environ.get("EDGELMM_CACHE") or Path.home() / ".cache" / "edgelmm").expanduser()
