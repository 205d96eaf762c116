"""``edgelmm.json``: the manifest an edgelmm export writes beside its weights, and its verification.

The manifest records what the folder is (family, prompt template, number of image tokens, quantization
settings, the tool that wrote it) and the sha256 of every other file in the folder, subfolders included,
keyed by the path relative to the folder with ``/`` separators::

    {"format_version": 1, "family": "tinyllava", "template": "phi", "image_tokens": 728,
     "quantization": {"method": "gptq", "bits": 4, "group_size": 128, ...},
     "files": {"config.json": "<sha256 hex>", "model-00001-of-00002.safetensors": "...", ...}}

Loading verifies every listed file and raises :class:`ChecksumError` naming the first damaged or missing
one. Folders without a manifest (checkpoints written by other tools) are not checked. Torch-free.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .errors import CheckpointError, ChecksumError

MANIFEST = "edgelmm.json"
FORMAT_VERSION = 1
_CHUNK = 1 << 20


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
    if manifest.get("format_version", FORMAT_VERSION) > FORMAT_VERSION:
        raise CheckpointError(f"{path} has format_version {manifest['format_version']}, newer than this "
                              f"edgelmm understands ({FORMAT_VERSION}); upgrade edgelmm")
    return manifest


def verify_manifest(folder: Path) -> dict | None:
    """Check every file the manifest lists against its sha256; return the manifest (None if absent).

    Raises :class:`ChecksumError` naming the first file that is missing or whose content changed.
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest is None:
        return None
    for name, expected in sorted(manifest["files"].items()):
        path = folder / name
        if not path.is_file():
            raise ChecksumError(f"{name} is listed in {MANIFEST} but missing from {folder}; copy the whole "
                                "folder again")
        if sha256_file(path) != expected:
            raise ChecksumError(f"{name} in {folder} is damaged: its sha256 differs from the one in "
                                f"{MANIFEST}; copy or export it again")
    return manifest
