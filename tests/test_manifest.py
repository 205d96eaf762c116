"""The edgelmm.json manifest of an export: a damaged file is named by a ChecksumError, and files already
checked are not hashed again until they change."""
import os
import shutil

import pytest

from edgelmm import EdgeLMM
from edgelmm.checkpoint import manifest
from edgelmm.errors import ChecksumError
from edgelmm.export.gptq_export import export_gptq
from edgelmm.export.gptq_settings import QuantSettings


@pytest.fixture(scope="module")
def export8(tiny_checkpoint, tmp_path_factory):
    """An 8-bit RTN GPTQ export of the tiny Mipha (made once)."""
    out = tmp_path_factory.mktemp("manifest") / "mipha-8bit"
    return export_gptq(tiny_checkpoint("mipha"), out, QuantSettings(bits=8, method="rtn"), progress=False).out


@pytest.mark.parametrize("victim", ["model-00001-of-00001.safetensors", "tokenizer_config.json"])
def test_flipped_byte_fails_load_with_checksum_error(victim, export8, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(export8, folder)
    EdgeLMM.load(folder)  # intact: loads
    data = bytearray((folder / victim).read_bytes())
    data[len(data) // 2] ^= 0x01
    (folder / victim).write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match=victim):
        EdgeLMM.load(folder)


def test_checked_files_are_not_hashed_again_until_they_change(export8, tmp_path, monkeypatch):
    folder = tmp_path / "copy"
    shutil.copytree(export8, folder)
    hashed = []
    real_sha256 = manifest.sha256_file
    monkeypatch.setattr(manifest, "sha256_file", lambda path: hashed.append(path.name) or real_sha256(path))
    files = len(manifest.read_manifest(folder)["files"])
    manifest.verify_manifest(folder)
    manifest.verify_manifest(folder)
    assert len(hashed) == 2 * files  # just written (within the racy window): not remembered yet
    monkeypatch.setattr(manifest, "_RACY_SECONDS", -1.0)  # as if they had been written a while ago
    hashed.clear()
    manifest.verify_manifest(folder)
    manifest.verify_manifest(folder)
    assert len(hashed) == files  # hashed once, then remembered
    victim = folder / "model-00001-of-00001.safetensors"
    intact, stamp = victim.read_bytes(), victim.stat()
    damaged = bytearray(intact)
    damaged[len(damaged) // 2] ^= 0x01
    victim.write_bytes(bytes(damaged))
    os.utime(victim, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))  # size and mtime as before: ctime still moved
    with pytest.raises(ChecksumError, match=victim.name):
        manifest.verify_manifest(folder)
    victim.write_bytes(intact)
    monkeypatch.setenv("EDGELMM_VERIFY", "full")
    hashed.clear()
    manifest.verify_manifest(folder)
    assert len(hashed) == files  # full: every file, every time
