"""Atomic output folders: an export (or a make-tiny checkpoint) is written to a hidden temporary folder beside
``OUT`` and renamed to ``OUT`` only once complete, so an interrupted or failed export never leaves a partial
``OUT``. The temporary folder's name records the writing process (``.OUT.partial-PID.HOST-XXXXXXXX``), so
the next staging in the same parent folder deletes those left by killed processes of this machine."""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from edgelmm.errors import ConfigError

_PARTIAL = re.compile(r"^\..+\.partial-(\d+)\.([0-9a-f]{8})-[^/]+$")


def _host_tag() -> str:
    """8 hex digits naming this machine (a parent folder may be shared over the network)."""
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    except OverflowError:
        return False
    return True


def clean_stale(parent: Path) -> list[Path]:
    """Delete the staging folders in ``parent`` whose writer, a process of this machine, is no longer alive
    (killed exports); return them. Folders of live processes, of other machines, and anything not named like
    a staging folder are left alone."""
    removed = []
    try:
        entries = list(parent.iterdir())
    except OSError:
        return removed
    host = _host_tag()
    for entry in entries:
        match = _PARTIAL.match(entry.name)
        if match and match[2] == host and not _alive(int(match[1])) and entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def check_new(out: str | Path) -> Path:
    """``out`` as a Path; ConfigError when it already exists (exports never overwrite)."""
    out = Path(out).expanduser()
    if out.exists():
        raise ConfigError(f"{out} already exists; choose a new output folder")
    return out


@contextmanager
def staging(out: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder ``.OUT.partial-PID.HOST-*`` beside ``out``; rename it to ``out`` when the
    block completes, delete it when the block raises (including KeyboardInterrupt / SystemExit). A SIGKILL
    leaves the hidden temporary folder behind, never ``out``; the next staging beside it deletes it."""
    out = check_new(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(out.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-{os.getpid()}.{_host_tag()}-", dir=out.parent))
    tmp.chmod(0o755)
    try:
        yield tmp
        check_new(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
