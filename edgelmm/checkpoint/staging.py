"""Atomic output folders: an export (or a make-tiny checkpoint) is written to a hidden temporary folder beside ``OUT`` and renamed to
``OUT`` only once complete, so an interrupted or failed export never leaves a partial ``OUT``."""
from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from edgelmm.errors import ConfigError


def check_new(out: str | Path) -> Path:
    """``out`` as a Path; ConfigError when it already exists (exports never overwrite)."""
    out = Path(out).expanduser()
    if out.exists():
        raise ConfigError(f"{out} already exists; choose a new output folder")
    return out


@contextmanager
def staging(out: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder ``.OUT.partial-*`` beside ``out``; rename it to ``out`` when the block
    completes, delete it when the block raises (including KeyboardInterrupt / SystemExit). A SIGKILL leaves
    the hidden temporary folder behind, never ``out``."""
    out = check_new(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    tmp.chmod(0o755)
    try:
        yield tmp
        check_new(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
