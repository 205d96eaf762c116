"""Bad checkpoints and prompts raise typed errors that say what to do; the CLI prints them in one line."""
import json
import shutil
import subprocess
import sys

import pytest
from reference import sample_image

from edgelmm import EdgeLMM
from edgelmm.errors import CheckpointError, ImageError, PromptTooLongError, ShapeMismatchError, UnsupportedModelError


@pytest.fixture
def copy(tiny_checkpoint, tmp_path):
    def make(family="tinyllava"):
        dst = tmp_path / family
        shutil.copytree(tiny_checkpoint(family), dst)
        return dst
    return make


def _edit_config(folder, **changes):
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


def test_unsupported_model_type(copy):
    folder = copy()
    _edit_config(folder, model_type="blip-2")
    with pytest.raises(UnsupportedModelError, match="blip-2.*not supported"):
        EdgeLMM.load(folder)


def test_missing_config(copy):
    folder = copy()
    (folder / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json not found"):
        EdgeLMM.load(folder)


def test_not_a_folder(tmp_path):
    with pytest.raises(CheckpointError, match="not a folder"):
        EdgeLMM.load(tmp_path / "nowhere")


def test_missing_shard(copy):
    folder = copy()
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors.*missing"):
        EdgeLMM.load(folder)


@pytest.mark.parametrize("damage", ["truncate", "garbage_header"])
def test_corrupt_shard(copy, damage):
    folder = copy()
    shard = folder / "model-00001-of-00002.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\xff" * 64 + data[64:])
    with pytest.raises(CheckpointError, match="model-00001-of-00002.safetensors"):
        EdgeLMM.load(folder)


def test_tensor_shape_mismatch(copy):
    folder = copy()
    cfg = json.loads((folder / "config.json").read_text())
    size = cfg["text_config"]["intermediate_size"]
    cfg["text_config"]["intermediate_size"] += 8
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ShapeMismatchError, match=rf"mlp\.fc1\.(weight|bias) .* has shape \({size}\b.* but config\.json "
                                                 rf"implies \({size + 8}\b"):
        EdgeLMM.load(folder)


def test_legacy_without_its_vision_tower(copy):
    folder = copy("tinyllava-legacy")
    shutil.rmtree(folder / "siglip_vision_tower")
    with pytest.raises(CheckpointError, match="TinyLLaVA-3.1B-SigLIP.*vision_tower=PATH"):
        EdgeLMM.load(folder)


def test_legacy_finds_its_tower_beside_the_checkpoint(copy):
    folder = copy("tinyllava-legacy")
    (folder / "siglip_vision_tower").rename(folder.parent / "TinyLLaVA-3.1B-SigLIP")
    model = EdgeLMM.load(folder)
    assert model.spec.vision_dir == folder.parent / "TinyLLaVA-3.1B-SigLIP"


def test_prompt_longer_than_the_context(tiny_checkpoint):
    model = EdgeLMM.load(tiny_checkpoint("tinyllava"), context_length=800)
    with pytest.raises(PromptTooLongError, match="context holds 800"):
        model.ask(sample_image(), "word " * 200)


def test_bad_image_through_the_api(tiny_checkpoint, tmp_path):
    model = EdgeLMM.load(tiny_checkpoint("tinyllava"))
    (tmp_path / "x.jpg").write_bytes(b"not an image at all")
    with pytest.raises(ImageError):
        model.ask(tmp_path / "x.jpg", "hi")


def test_cli_reports_errors_in_one_line(copy, tmp_path):
    folder = copy()
    _edit_config(folder, model_type="blip-2")
    image = tmp_path / "i.png"
    sample_image().save(image)
    proc = subprocess.run([sys.executable, "-m", "edgelmm.cli", "ask", str(folder), "--image", str(image),
                           "--prompt", "hi"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.startswith("edgelmm: error: model_type 'blip-2'") and "Traceback" not in proc.stderr
