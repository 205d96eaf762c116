"""``edgelmm.json``: the manifest an edgelmm export writes beside its weights, and its verification.

The manifest records what the folder is (family, prompt template, number of image tokens, quantization
settings, the tool that wrote it) and the sha256 of every other file in the folder, subfolders included,
keyed by the path relative to the folder with ``/`` separators::

    {"format_version": 1, "family": "tinyllava", "template": "phi", "image_tokens": 728,
     "quantization": {"method": "gptq", "bits": 4, "group_size": 128, ...},
     "files": {"config.json": "<sha256 hex>", "model-00001-of-00002.safetensors": "...", ...}}

Loading verifies every listed file and raises :class:`ChecksumError` naming the first damaged or missing
one, or a file edgelmm may read that the manifest does not list. Folders without a manifest (checkpoints
written by other tools) are not checked; one that an edgelmm export wrote (or its ``.OUT.partial-*`` staging
folder) without the manifest, which is written last, is refused. Torch-free.

A file whose sha256 was checked once is not hashed again while its size, modification and status-change times,
inode and device are unchanged (git's index does the same; the status-change time cannot be set back, so a
rewrite that restores the modification time is still seen): those are remembered in ``verified.json`` under the
cache folder (``$EDGELMM_CACHE``, else ``~/.cache/edgelmm``). Files modified within two seconds of being checked
are not remembered (a same-tick rewrite would keep the stamp). ``EDGELMM_VERIFY=full`` hashes every file every
time.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path, PurePosixPath
from stat import S_ISREG

from edgelmm.errors import CheckpointError, ChecksumError
from edgelmm.paths import cache_root

MANIFEST = "edgelmm.json"
FORMAT_VERSION = 1
_CHUNK = 1 << 20
VERIFIED = "verified.json"
_RACY_SECONDS = 2.0
READ_SUFFIXES = {".safetensors", ".bin", ".pth", ".pt", ".onnx", ".data", ".json", ".model", ".txt", ".tiktoken"}


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _files(folder: Path) -> list[str]:
    """Every regular file under ``folder`` except the manifest, as sorted ``/``-separated relative paths."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if p.is_file() and p.relative_to(folder).as_posix() != MANIFEST)


def write_manifest(folder: Path, info: dict) -> Path:
    """Write ``folder/edgelmm.json``: ``info`` (family, template, image_tokens, quantization, ...) plus
    the sha256 of every file now in ``folder``. Call it last, once every other file is written."""
    folder = Path(folder)
    files = {name: sha256_file(folder / name) for name in _files(folder)}
    manifest = {"format_version": FORMAT_VERSION, **info, "files": files}
    path = folder / MANIFEST
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return path


def _inside(name: str) -> bool:
    """Whether a manifest entry names a path inside the folder (relative, no ``..``)."""
    parts = PurePosixPath(name).parts
    return bool(parts) and not name.startswith(("/", "\\")) and ".." not in parts and ":" not in parts[0]


def looks_like_export(folder: Path) -> bool:
    """Whether ``folder`` was written by an edgelmm export (or is one's staging folder): a ``.OUT.partial-*``
    name, an ONNX ``genai_config.json``, or a GPTQ ``quantization_config`` whose quantizer is edgelmm."""
    if ".partial-" in folder.name or (folder / "genai_config.json").is_file():
        return True
    try:
        cfg = json.loads((folder / "config.json").read_text())
        quantizers = cfg["quantization_config"]["meta"]["quantizer"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return isinstance(quantizers, list) and any(str(q).startswith("edgelmm:") for q in quantizers)


def check_covered(folder: Path, manifest: dict) -> None:
    """ChecksumError naming the first file edgelmm may read (weights, graphs, JSON, tokenizer files) that is
    in ``folder`` but not in the manifest: an unlisted file would load unchecked."""
    listed = set(manifest["files"])
    for name in _files(folder):
        if PurePosixPath(name).suffix in READ_SUFFIXES and name not in listed:
            raise ChecksumError(f"{name} in {folder} is not listed in {MANIFEST}, so its checksum cannot be "
                                "checked; remove it or export the model again")


def read_manifest(folder: Path) -> dict | None:
    """The parsed manifest of ``folder``, or None when it has none."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ChecksumError(f"{path} is damaged ({e}); export the model again") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise ChecksumError(f"{path} has no 'files' table; export the model again")
    for name, digest in manifest["files"].items():
        if not _inside(name) or not isinstance(digest, str):
            raise ChecksumError(f"{path} lists {name!r}: {digest!r}, not a file inside the folder and its sha256; "
                                "export the model again")
    version = manifest.get("format_version", FORMAT_VERSION)
    if isinstance(version, bool) or not isinstance(version, int):
        raise ChecksumError(f"{path} has format_version {version!r}, not an integer; export the model again")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{path} has format_version {manifest['format_version']}, newer than this "
                              f"edgelmm understands ({FORMAT_VERSION}); upgrade edgelmm")
    return manifest


class VerifiedFiles:
    """The files whose sha256 was checked, keyed by absolute path: ``[size, mtime_ns, ctime_ns, inode, device,
    sha256]``.
    An unreadable or unwritable cache only means hashing again."""

    def __init__(self, path: Path):
        self.path, self.changed = path, False
        try:
            entries = json.loads(path.read_text())
        except (OSError, ValueError):
            entries = None
        self.entries: dict = entries if isinstance(entries, dict) else {}

    @staticmethod
    def _stamp(stat: os.stat_result, sha256: str) -> list:
        return [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino, stat.st_dev, sha256]

    def knows(self, path: Path, stat: os.stat_result, sha256: str) -> bool:
        """Whether ``path`` was checked against ``sha256`` and has not changed since."""
        return self.entries.get(str(path)) == self._stamp(stat, sha256)

    def add(self, path: Path, stat: os.stat_result, sha256: str) -> None:
        if time.time() - max(stat.st_mtime, stat.st_ctime) > _RACY_SECONDS:
            self.entries[str(path)] = self._stamp(stat, sha256)
            self.changed = True

    def save(self) -> None:
        """Write the cache (entries of deleted files dropped) atomically; errors are ignored."""
        if not self.changed:
            return
        entries = {name: entry for name, entry in self.entries.items() if os.path.exists(name)}
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(entries))
            os.replace(tmp, self.path)
        except OSError:
            tmp.unlink(missing_ok=True)


def verify_manifest(folder: Path) -> dict | None:
    """Check every file the manifest lists against its sha256 (skipping files already checked and unchanged,
    see the module docstring); return the manifest (None if absent: a checkpoint another tool wrote).

    Raises :class:`ChecksumError` naming the first file that is missing, whose content changed, or that edgelmm
    may read but the manifest does not list; :class:`CheckpointError` for an edgelmm export without a manifest.
    """
    folder = Path(folder).resolve()
    manifest = read_manifest(folder)
    if manifest is None:
        if looks_like_export(folder):
            raise CheckpointError(f"{folder} is an edgelmm export without its {MANIFEST}, which an export writes "
                                  "last: the export was interrupted; export the model again")
        return None
    check_covered(folder, manifest)
    verified = VerifiedFiles(cache_root() / VERIFIED)
    full = os.environ.get("EDGELMM_VERIFY") == "full"
    for name, expected in sorted(manifest["files"].items()):
        path = folder / name
        try:
            stat = path.stat()
        except OSError:
            stat = None
        if stat is None or not S_ISREG(stat.st_mode):
            raise ChecksumError(f"{name} is listed in {MANIFEST} but missing from {folder}; copy the whole "
                                "folder again")
        if not full and verified.knows(path, stat, expected):
            continue
        if sha256_file(path) != expected:
            raise ChecksumError(f"{name} in {folder} is damaged: its sha256 differs from the one in "
                                f"{MANIFEST}; copy or export it again")
        verified.add(path, stat, expected)
    verified.save()
    return manifest
