"""Damaged checkpoints and exports: each damage gives a typed edgelmm error naming the file or field (through
the API, and for a few through the CLI: exit 2, one line, no traceback), never another exception or a
silently wrong load. A seeded fuzz of safetensors headers, config.json and edgelmm.json checks that every
outcome is a load or an edgelmm error; ``-m fuzz`` runs a larger one."""
import json
import os
import random
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch
from reference import sample_image
from safetensors.torch import load_file, save_file

from edgelmm import EdgeLMM
from edgelmm.checkpoint import staging
from edgelmm.checkpoint.finite import require_finite
from edgelmm.checkpoint.manifest import MANIFEST, verify_manifest
from edgelmm.errors import (
    CheckpointError,
    ChecksumError,
    ConfigError,
    EdgeLMMError,
    NonFiniteLogitsError,
)
from edgelmm.export.gptq_export import export_gptq
from edgelmm.export.gptq_settings import QuantSettings

SHARD = "model-00001-of-00002.safetensors"
OTHER_SHARD = "model-00002-of-00002.safetensors"


@pytest.fixture
def copy(tiny_checkpoint, tmp_path):
    def make(family="tinyllava"):
        dst = tmp_path / family
        shutil.copytree(tiny_checkpoint(family), dst)
        return dst
    return make


@pytest.fixture(scope="module")
def gptq_export(tiny_checkpoint, tmp_path_factory):
    """A 4-bit symmetric RTN GPTQ export of the tiny TinyLLaVA (made once)."""
    out = tmp_path_factory.mktemp("damaged") / "gptq4"
    return export_gptq(tiny_checkpoint("tinyllava"), out, QuantSettings(bits=4, method="rtn"), progress=False).out


def read_header(path):
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + length]), data[8 + length:]


def write_header(path, header, body):
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + body)


def edit_json(path, change):
    data = json.loads(path.read_text())
    path.write_text(json.dumps(change(data)))


def first_tensor(header):
    return next(k for k in header if k != "__metadata__")


def fill_embeddings(folder, value):
    """Overwrite the token embeddings of a tiny TinyLLaVA with ``value`` (a load that used to go through)."""
    key = "language_model.model.embed_tokens.weight"
    shard = folder / json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"][key]
    tensors = load_file(shard)
    tensors[key] = torch.full_like(tensors[key], value)
    save_file(tensors, shard, metadata={"format": "pt"})


def without_manifest(folder):
    """Turn an edgelmm export into a GPTQ checkpoint 'of another tool': no edgelmm.json, no edgelmm quantizer."""
    (folder / MANIFEST).unlink()

    def strip(cfg):
        cfg["quantization_config"].pop("meta")
        return cfg
    edit_json(folder / "config.json", strip)


# --- untyped exceptions become typed errors ---------------------------------------------------------------

@pytest.mark.parametrize("header", [[1, 2], 7, None, "text"])
def test_safetensors_header_that_is_not_an_object(copy, header):
    folder = copy()
    _, body = read_header(folder / SHARD)
    write_header(folder / SHARD, header, body)
    with pytest.raises(CheckpointError, match=f"{SHARD}.*header is a JSON"):
        EdgeLMM.load(folder)


@pytest.mark.parametrize("field,value", [("shape", ["4", 2]), ("shape", 5), ("shape", [2.5]), ("shape", [-1]),
                                         ("data_offsets", "0-16"), ("data_offsets", [0.0, 16.0]),
                                         ("data_offsets", [0, 1, 2]), ("dtype", "F33")])
def test_safetensors_entry_of_the_wrong_type(copy, field, value):
    folder = copy()
    header, body = read_header(folder / SHARD)
    header[first_tensor(header)][field] = value
    write_header(folder / SHARD, header, body)
    with pytest.raises(CheckpointError, match=f"{SHARD}.*{first_tensor(header)}"):
        EdgeLMM.load(folder)


def test_index_naming_a_tensor_missing_from_its_shard(copy):
    folder = copy()
    index = folder / "model.safetensors.index.json"
    key = next(k for k, v in json.loads(index.read_text())["weight_map"].items() if v == SHARD)

    def move(data):
        data["weight_map"][key] = OTHER_SHARD
        return data
    edit_json(index, move)
    with pytest.raises(CheckpointError, match=f"{key} is not in .*{OTHER_SHARD}"):
        EdgeLMM.load(folder)


@pytest.mark.parametrize("name", ["config.json", "model.safetensors.index.json"])
@pytest.mark.parametrize("value", [[], [1, 2], 3, None])
def test_json_file_that_is_not_an_object(copy, name, value):
    folder = copy()
    (folder / name).write_text(json.dumps(value))
    with pytest.raises(CheckpointError, match=f"{name} holds a JSON"):
        EdgeLMM.load(folder)


@pytest.mark.parametrize("section,field,value", [
    ("text_config", "num_attention_heads", 0), ("vision_config", "patch_size", 0),
    ("vision_config", "num_attention_heads", 0), ("text_config", "hidden_size", -160),
    ("text_config", "num_hidden_layers", "2"), ("text_config", "rope_theta", 0),
    ("text_config", "rope_theta", float("inf")), ("text_config", "layer_norm_eps", float("nan")),
    ("text_config", "layer_norm_eps", -1e-5), ("vision_config", "layer_norm_eps", float("nan")),
    ("text_config", "num_attention_heads", 3),  # 160 is not a multiple of 3
    ("text_config", "partial_rotary_factor", float("nan")), ("text_config", "vocab_size", True)])
def test_config_numbers_are_validated_at_parse_time(copy, section, field, value):
    folder = copy()

    def change(cfg):
        cfg[section][field] = value
        return cfg
    edit_json(folder / "config.json", change)
    with pytest.raises(ConfigError, match=field):
        EdgeLMM.load(folder)


@pytest.mark.parametrize("section", ["text_config", "vision_config"])
def test_nested_config_that_is_not_an_object(copy, section):
    folder = copy()
    edit_json(folder / "config.json", lambda cfg: {**cfg, section: [1, 2]})
    with pytest.raises(ConfigError, match=f"{section} in config.json"):
        EdgeLMM.load(folder)


def test_preprocessor_config_that_is_not_json(copy):
    folder = copy()
    (folder / "preprocessor_config.json").write_text('{"image_mean": [0.5, 0.5')
    with pytest.raises(CheckpointError, match="preprocessor_config.json is not valid JSON"):
        EdgeLMM.load(folder)


def test_integer_typed_weights(copy):
    folder = copy()
    header, body = read_header(folder / SHARD)
    key = first_tensor(header)
    header[key]["dtype"] = {"F32": "I32", "F16": "I16", "BF16": "I16"}[header[key]["dtype"]]  # same size
    write_header(folder / SHARD, header, body)
    with pytest.raises(CheckpointError, match=rf"{key} in {SHARD} is stored as torch.int(32|16), but it is a float"):
        EdgeLMM.load(folder)


def test_gptq_g_idx_out_of_range(gptq_export, tmp_path):
    folder = tmp_path / "gptq"
    shutil.copytree(gptq_export, folder)
    without_manifest(folder)
    shard = next(folder.glob("*.safetensors"))
    tensors = load_file(shard)
    key = min(k for k in tensors if k.endswith(".g_idx"))
    groups = tensors[key[:-len("g_idx")] + "scales"].shape[0]
    tensors[key] = tensors[key].clone()
    tensors[key][-1] = groups  # one past the last group
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=rf"g_idx holds groups \[0, {groups}\] but the layer has {groups}"):
        EdgeLMM.load(folder)


def test_gptq_relabelled_v2_is_refused(gptq_export, tmp_path):
    folder = tmp_path / "gptq"
    shutil.copytree(gptq_export, folder)
    without_manifest(folder)
    assert EdgeLMM.load(folder).ask(sample_image(), "hi", max_new_tokens=2) is not None  # as written: loads

    def relabel(cfg):
        assert cfg["quantization_config"]["checkpoint_format"] == "gptq" and cfg["quantization_config"]["sym"]
        cfg["quantization_config"]["checkpoint_format"] = "gptq_v2"
        return cfg
    edit_json(folder / "config.json", relabel)
    with pytest.raises(CheckpointError, match=r"qzeros read as \[7\] under checkpoint_format 'gptq_v2'.*all 8"):
        EdgeLMM.load(folder)


def test_malicious_pickle_is_refused_without_running(copy, tmp_path):
    folder = copy()
    for name in (SHARD, OTHER_SHARD, "model.safetensors.index.json"):
        (folder / name).unlink()
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)
    torch.save({"weight": Payload()}, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pytorch_model.bin is truncated, corrupt or not a plain tensor file"):
        EdgeLMM.load(folder)
    assert not marker.exists()


@pytest.fixture(scope="module")
def onnx_export(tiny_checkpoint, tmp_path_factory):
    """An fp32 ONNX export of the tiny TinyLLaVA (made once)."""
    pytest.importorskip("onnxruntime")
    from edgelmm.export import onnx_graph  # noqa: F401 - the export package, imported in its own order
    from edgelmm.export.onnx_export import export_onnx

    return export_onnx(tiny_checkpoint("tinyllava"), tmp_path_factory.mktemp("damaged") / "onnx", None,
                       progress=False, vision_bits=16)


@pytest.mark.parametrize("graph", ["decoder.onnx", "vision.onnx", "embedding.onnx"])
def test_truncated_onnx_graph(onnx_export, tmp_path, graph):
    from edgelmm.backends.onnx.backend import OnnxBackend

    folder = tmp_path / "onnx"
    shutil.copytree(onnx_export, folder)
    data = (folder / graph).read_bytes()
    (folder / graph).write_bytes(data[: len(data) // 3])
    with pytest.raises(ChecksumError, match=graph):  # with its manifest: the checksum names it
        EdgeLMM.load(folder)
    (folder / MANIFEST).unlink()
    with pytest.raises(CheckpointError, match=f"without its {MANIFEST}"):  # without: an interrupted export
        EdgeLMM.load(folder)
    with pytest.raises(CheckpointError, match=f"{graph} .*is truncated or corrupt"):  # the backend alone
        OnnxBackend.load(folder)


def test_fuzz_genai_config(onnx_export, tmp_path):
    from edgelmm.backends.onnx.backend import OnnxBackend

    folder = tmp_path / "onnx"
    shutil.copytree(onnx_export, folder)
    path = folder / "genai_config.json"
    pristine, rng = json.loads(path.read_text()), random.Random(2)
    for case in range(60):
        path.write_text(json.dumps(_mutate(pristine, rng)))
        try:
            OnnxBackend.load(folder, vision=False)
        except EdgeLMMError as e:
            assert "\n" not in str(e), str(e)
        except Exception as e:
            raise AssertionError(f"case {case}: {type(e).__name__}: {e}") from e


# --- silently wrong loads are refused ---------------------------------------------------------------------

@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_fail_at_the_first_logits(copy, value):
    folder = copy()
    fill_embeddings(folder, value)
    model = EdgeLMM.load(folder)
    with pytest.raises(NonFiniteLogitsError, match="NaN/infinite logits .* at the prefill"):
        model.ask(sample_image(), "hi", max_new_tokens=4)


def test_require_finite_matches_numpy():
    logits = np.linspace(-3, 3, 50, dtype=np.float32)
    assert require_finite(logits, "prefill") is logits
    for bad in (np.nan, np.inf, -np.inf):
        damaged = logits.copy()
        damaged[[3, 7]] = bad
        with pytest.raises(NonFiniteLogitsError, match=r"computed 2 NaN/infinite logits of 50 at the decode at"):
            require_finite(damaged, "decode at position 9")


def test_fewer_layers_in_config_than_in_the_checkpoint(copy):
    folder = copy()

    def drop(cfg):
        cfg["text_config"]["num_hidden_layers"] = 1
        return cfg
    edit_json(folder / "config.json", drop)
    with pytest.raises(CheckpointError, match="config says 1 decoder layers but the checkpoint holds 2"):
        EdgeLMM.load(folder)


@pytest.mark.parametrize("layers,says", [(2, "says 2 vision tower layers but the checkpoint holds 3"),
                                         (9, "needs 8 vision tower layers but the checkpoint holds 3")])
def test_vision_layers_inconsistent_with_the_checkpoint(copy, layers, says):
    folder = copy()  # its tower: 3 layers, features from the second to last (-2)

    def change(cfg):
        cfg["vision_config"]["num_hidden_layers"] = layers
        return cfg
    edit_json(folder / "config.json", change)
    with pytest.raises(CheckpointError, match=says):
        EdgeLMM.load(folder)


def test_image_size_inconsistent_with_the_position_embedding(copy):
    folder = copy()

    def grow(cfg):
        cfg["vision_config"]["image_size"] += 28
        return cfg
    edit_json(folder / "config.json", grow)
    with pytest.raises(CheckpointError, match="position_embedding"):
        EdgeLMM.load(folder)


def test_shard_removed_from_the_manifest_is_refused(gptq_export, tmp_path):
    folder = tmp_path / "gptq"
    shutil.copytree(gptq_export, folder)
    shard = next(folder.glob("*.safetensors")).name

    def forget(manifest):
        del manifest["files"][shard]
        return manifest
    edit_json(folder / MANIFEST, forget)
    with pytest.raises(ChecksumError, match=f"{shard} .* is not listed in {MANIFEST}"):
        EdgeLMM.load(folder)


@pytest.mark.parametrize("name", ["../config.json", "/etc/hostname", "a/../../b"])
def test_manifest_paths_outside_the_folder(gptq_export, tmp_path, name):
    folder = tmp_path / "gptq"
    shutil.copytree(gptq_export, folder)
    edit_json(folder / MANIFEST, lambda m: {**m, "files": {**m["files"], name: "0" * 64}})
    with pytest.raises(ChecksumError, match="not a file inside the folder"):
        EdgeLMM.load(folder)


@pytest.mark.parametrize("name", ["../elsewhere.safetensors", "/tmp/elsewhere.safetensors", "sub/../../x"])
def test_index_shard_paths_outside_the_folder(copy, name):
    folder = copy()
    index = folder / "model.safetensors.index.json"
    edit_json(index, lambda d: {**d, "weight_map": {**d["weight_map"], "extra.weight": name}})
    with pytest.raises(CheckpointError, match="not a file inside its folder"):
        EdgeLMM.load(folder)


def test_export_without_its_manifest_is_refused(gptq_export, tmp_path):
    folder = tmp_path / "gptq"
    shutil.copytree(gptq_export, folder)
    (folder / MANIFEST).unlink()
    with pytest.raises(CheckpointError, match=f"edgelmm export without its {MANIFEST}.*interrupted"):
        EdgeLMM.load(folder)


def test_complete_looking_staging_folder_is_refused(tiny_checkpoint, tmp_path):
    folder = tmp_path / f".out.partial-{os.getpid()}.0123abcd-xyz"
    shutil.copytree(tiny_checkpoint("tinyllava"), folder)
    with pytest.raises(CheckpointError, match="interrupted"):
        verify_manifest(folder)


# --- hygiene: staging folders of killed exports -----------------------------------------------------------

def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_staging_cleans_partial_folders_of_dead_processes_only(tmp_path):
    host = staging._host_tag()
    dead = tmp_path / f".a.partial-{_dead_pid()}.{host}-x1"
    alive = tmp_path / f".b.partial-{os.getpid()}.{host}-x2"
    elsewhere = tmp_path / f".c.partial-{_dead_pid()}.{'0' * 8 if host != '0' * 8 else '1' * 8}-x3"
    unnamed = tmp_path / ".d.partial-k2j3h4"  # no pid recorded: left alone
    for folder in (dead, alive, elsewhere, unnamed):
        folder.mkdir()
        (folder / "config.json").write_text("{}")
    with staging.staging(tmp_path / "out") as tmp:
        (tmp / "f").write_text("x")
        assert staging._PARTIAL.match(tmp.name)
    assert not dead.exists()
    assert alive.exists() and elsewhere.exists() and unnamed.exists()
    assert (tmp_path / "out" / "f").read_text() == "x"


def test_killed_export_leaves_a_folder_the_next_one_removes(tmp_path):
    script = ("import os, sys\nfrom edgelmm.checkpoint.staging import staging\n"
              "with staging(sys.argv[1]) as tmp:\n    (tmp / 'half').write_text('x')\n    os._exit(9)\n")
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "out")], capture_output=True, timeout=120, check=False)
    assert proc.returncode == 9
    left = [p for p in tmp_path.iterdir() if ".partial-" in p.name]
    assert len(left) == 1 and not (tmp_path / "out").exists()
    with staging.staging(tmp_path / "out2"):
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out2"]


def test_cached_ops_library_is_verified(tmp_path):
    from edgelmm.backends.onnx import ops

    library = tmp_path / "libx.so"
    library.write_bytes(b"\x7fELF" + bytes(range(256)))
    assert not ops._intact(library)  # no recorded sha256
    ops._sha256_path(library).write_text(__import__("hashlib").sha256(library.read_bytes()).hexdigest())
    assert ops._intact(library)
    library.write_bytes(b"\x7fELF" + bytes(range(255)))  # truncated
    assert not ops._intact(library)


# --- the command line -------------------------------------------------------------------------------------

def _damage_header(folder):
    _, body = read_header(folder / SHARD)
    write_header(folder / SHARD, [1, 2], body)


def _damage_config(folder):
    (folder / "config.json").write_text("[]")


def _damage_heads(folder):
    edit_json(folder / "config.json", lambda c: {**c, "text_config": {**c["text_config"], "num_attention_heads": 0}})


@pytest.mark.parametrize("damage,says", [(_damage_header, SHARD), (_damage_config, "config.json"),
                                         (_damage_heads, "num_attention_heads"),
                                         (lambda folder: fill_embeddings(folder, float("nan")), "NaN/infinite")])
def test_cli_reports_damage_in_one_line(copy, tmp_path, damage, says):
    folder = copy()
    damage(folder)
    image = tmp_path / "i.png"
    sample_image().save(image)
    proc = subprocess.run([sys.executable, "-m", "edgelmm.cli", "ask", str(folder), "--image", str(image),
                           "--prompt", "hi"], capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("edgelmm: error: ") and says in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


# --- fuzz: every outcome is a load or an edgelmm error ----------------------------------------------------

_ODD_VALUES = [None, True, 0, -1, 1, 2**40, 0.5, float("nan"), float("inf"), "", "x", [], [1], {}, {"a": 1}]


def _mutate(value, rng: random.Random):
    """``value`` with one random change at a random depth: a value replaced, a key deleted or added."""
    if isinstance(value, dict) and value and rng.random() < 0.8:
        key = rng.choice(sorted(value))
        op = rng.random()
        if op < 0.15:
            return {k: v for k, v in value.items() if k != key}
        if op < 0.25:
            return {**value, rng.choice(["x", "__metadata__", "dtype"]): rng.choice(_ODD_VALUES)}
        return {**value, key: _mutate(value[key], rng)}
    if isinstance(value, list) and value and rng.random() < 0.7:
        i = rng.randrange(len(value))
        return value[:i] + [_mutate(value[i], rng)] + value[i + 1:]
    if isinstance(value, (int, float)) and not isinstance(value, bool) and rng.random() < 0.5:
        return rng.choice([value + 1, value - 1, value * 2, -value, value // 2 if isinstance(value, int) else 0.0])
    return rng.choice(_ODD_VALUES)


def _fuzz_case(folder, pristine, target, rng):
    """Restore ``folder`` from ``pristine``, mutate ``target`` once, and load (and on success, answer)."""
    path = folder / target
    path.write_bytes(pristine[target])
    if target.endswith(".safetensors"):
        header, body = read_header(path)
        write_header(path, _mutate(header, rng), body)
    else:
        path.write_text(json.dumps(_mutate(json.loads(pristine[target]), rng)))
    try:
        model = EdgeLMM.load(folder)
        model.ask(sample_image(), "hi", max_new_tokens=2)
    except EdgeLMMError as e:
        assert "\n" not in str(e), str(e)
    finally:
        path.write_bytes(pristine[target])


def _fuzz(folder, targets, cases, seed):
    rng = random.Random(seed)
    pristine = {t: (folder / t).read_bytes() for t in targets}
    for case in range(cases):
        target = targets[case % len(targets)]
        try:
            _fuzz_case(folder, pristine, target, rng)
        except Exception as e:
            raise AssertionError(f"seed {seed} case {case} ({target}): {type(e).__name__}: {e}") from e


@pytest.fixture
def fuzz_folders(copy, gptq_export, tmp_path):
    """A checkpoint, an export (fuzzed: its manifest) and the export as another tool's GPTQ checkpoint
    (fuzzed: its config.json with the quantization settings)."""
    checkpoint, export, foreign = copy(), tmp_path / "export", tmp_path / "foreign"
    shutil.copytree(gptq_export, export)
    shutil.copytree(gptq_export, foreign)
    without_manifest(foreign)
    return checkpoint, export, foreign


CHECKPOINT_FILES = [SHARD, OTHER_SHARD, "config.json", "model.safetensors.index.json"]


def test_fuzz_headers_configs_and_manifests(fuzz_folders, monkeypatch):
    monkeypatch.setenv("EDGELMM_VERIFY", "full")
    checkpoint, export, foreign = fuzz_folders
    _fuzz(checkpoint, CHECKPOINT_FILES, 240, seed=0)
    _fuzz(export, [MANIFEST], 40, seed=1)
    _fuzz(foreign, ["config.json"], 40, seed=2)


@pytest.mark.fuzz
def test_fuzz_large(fuzz_folders, monkeypatch):
    monkeypatch.setenv("EDGELMM_VERIFY", "full")
    checkpoint, export, foreign = fuzz_folders
    _fuzz(checkpoint, CHECKPOINT_FILES, 3000, seed=100)
    _fuzz(export, [MANIFEST], 400, seed=101)
    _fuzz(foreign, ["config.json", next(p.name for p in foreign.glob("*.safetensors"))], 600, seed=102)


def test_mutations_change_the_files():
    rng = random.Random(0)
    header = {"a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}, "__metadata__": {"format": "pt"}}
    assert sum(json.dumps(_mutate(header, rng)) != json.dumps(header) for _ in range(100)) >= 90
