"""TinyGPT-V: the tiny replica of the released pieces against an independent reference built from transformers'
modules (tinygptv_reference.py), component by component and end to end; LoRA merge, KV cache, stop string,
and one typed error per missing or mismatched piece."""
import dataclasses
import json
import shutil

import pytest
import torch
from reference import sample_image
from safetensors.torch import load_file
from tinygptv_reference import TinyGPTVReference

from edgelmm import EdgeLMM
from edgelmm.config import TextConfig
from edgelmm.errors import CheckpointError, ConfigError, ShapeMismatchError, UnsupportedModelError
from edgelmm.export.gptq_export import export_gptq
from edgelmm.export.gptq_settings import QuantSettings
from edgelmm.export.onnx_export import export_onnx
from edgelmm.models.kv_cache import KVCache
from edgelmm.models.layers import bind_kernels
from edgelmm.models.text import TextModel
from edgelmm.processing.image import load_image, preprocess
from edgelmm.synthetic.tinygptv import make_tiny_tinygptv

QUESTION = "What is in the picture?"
STEPS = 12


@pytest.fixture(scope="module")
def replicas(tmp_path_factory):
    """Tiny replicas: stage 3 (224, LoRA), stage 4 (448, LoRA), stage 1 style (224, no LoRA)."""
    root = tmp_path_factory.mktemp("tinygptv")
    return {name: make_tiny_tinygptv(root / name, seed=i, stage=stage, lora=lora)
            for i, (name, stage, lora) in enumerate((("s3", 3, True), ("s4", 4, True), ("s1", 1, False)))}


@pytest.fixture(scope="module")
def loaded(replicas):
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = EdgeLMM.load(replicas[name]), TinyGPTVReference(replicas[name])
        return cache[name]
    return get


def _pixels(model, image):
    return torch.from_numpy(preprocess(load_image(image), model.spec.image))[None]


def test_qformer_matches_transformers_blip2_qformer(loaded):
    model, ref = loaded("s3")
    image_embeds = torch.randn(2, 37, model.spec.vision.eva.width, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ours = model.backend.model.qformer(image_embeds)
    expected = ref.qformer_out(image_embeds)
    assert ours.shape == (2, 32, model.spec.vision.qformer.hidden_size)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,tokens", [("s3", 257), ("s4", 1025)])
def test_eva_matches_transformers_blip2_vision(loaded, name, tokens):
    """All tokens of the last block, no final norm; at 448 the 16x16 positions are interpolated bicubically."""
    model, ref = loaded(name)
    size = model.spec.image.size
    pixels = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ours = model.backend.model.vision(pixels)
    assert ours.shape == (1, tokens, model.spec.vision.eva.width)
    torch.testing.assert_close(ours, ref.eva(pixels), rtol=1e-5, atol=1e-5)
    assert torch.equal(_pixels(model, sample_image()), ref.pixels(sample_image()))  # resize S x S, CLIP mean/std


def test_phi_parts_match_transformers_phi_with_qk_layernorm():
    """The decoder TinyGPT-V shares with stock Phi (QK LayerNorm on, no post-attention RMSNorm) against
    PhiForCausalLM(qk_layernorm=True), prefill and cached decode."""
    from transformers import PhiConfig, PhiForCausalLM

    torch.manual_seed(0)
    hf_cfg = PhiConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, partial_rotary_factor=0.4, qk_layernorm=True)
    hf = PhiForCausalLM(hf_cfg).eval()
    for name, p in hf.named_parameters():  # random norms and biases too, so every piece is exercised
        p.data = (1.0 if "norm" in name and name.endswith("weight") else 0.0) + 0.2 * torch.randn(p.shape)
    cfg = TextConfig.from_hf(hf_cfg.to_dict(), "phi")
    cfg.qk_layernorm = True
    ours = TextModel(cfg)
    bind_kernels(ours, "cpu")
    state = {k.removeprefix("model."): v for k, v in hf.state_dict().items()}
    missing, unexpected = ours.load_state_dict(state, strict=False)
    assert not missing and not [k for k in unexpected if "rotary" not in k]
    ids = torch.randint(0, 96, (1, 9))
    with torch.no_grad():
        expected = hf(input_ids=ids).logits[0]
        cache = KVCache(2, 4, 16, 16)
        prefill = ours(ours.embed(ids[:, :6]), cache, 0, last_only=False)[0]
        decoded = [ours(ours.embed(ids[:, i:i + 1]), cache, i)[0, -1] for i in range(6, 9)]
    got = torch.cat([prefill, torch.stack(decoded)])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_lora_merged_layer_equals_unmerged_fused_forward(loaded, replicas):
    """Upstream runs the fused query_key_value plus (alpha/r) B(A(x)) and views it as (B, T, heads, 3, Dh);
    edgelmm merged LoRA into q/k/v/dense once at load. Same outputs within 1e-5, and LoRA is not a no-op."""
    model, _ = loaded("s3")
    root = replicas["s3"].parent
    phi = {}
    for shard in (root / "phi-2").glob("model-*.safetensors"):
        phi.update({k: v.float() for k, v in load_file(shard).items()})
    stage = torch.load(root / "TinyGPT-V_for_Stage3.pth")
    scale = stage["config"]["model"]["lora_alpha"] / stage["config"]["model"]["lora_r"]
    t = model.spec.text
    x = torch.randn(1, 5, t.hidden_size, generator=torch.Generator().manual_seed(2))
    for i, layer in enumerate(model.backend.model.text.layers):
        lora = f"llama_model.base_model.model.model.layers.{i}.self_attn."
        base = f"model.layers.{i}.self_attn."
        a, b = (stage["model"][f"{lora}query_key_value.lora_{x}.weight"] for x in "AB")
        plain = x @ phi[base + "query_key_value.weight"].T + phi[base + "query_key_value.bias"]
        fused = (plain + scale * (x @ a.T) @ b.T).view(1, 5, t.num_heads, 3, t.head_dim)
        attn = layer.self_attn
        with torch.inference_mode():
            for j, proj in enumerate((attn.q_proj, attn.k_proj, attn.v_proj)):
                torch.testing.assert_close(proj(x), fused[..., j, :].flatten(-2), rtol=0, atol=1e-5)
            a, b = stage["model"][lora + "dense.lora_A.weight"], stage["model"][lora + "dense.lora_B.weight"]
            dense = x @ phi[base + "dense.weight"].T + phi[base + "dense.bias"] + scale * (x @ a.T) @ b.T
            torch.testing.assert_close(attn.dense(x), dense, rtol=0, atol=1e-5)
        assert (fused.flatten(-3) - plain).abs().max() > 1e-2  # the adapter changes the output


@pytest.mark.parametrize("name", ["s3", "s4", "s1"])
def test_end_to_end_matches_reference(loaded, name):
    """Prompt ids (no BOS, 32 image slots), prompt logits (merged vs unmerged LoRA) within 1e-5 of the logit
    scale, identical greedy tokens, and a mirrored image changes the answer in both."""
    model, ref = loaded(name)
    image = sample_image()
    before, after = ref.segments(QUESTION)
    rendered, ids = model.prompt_ids(QUESTION)
    assert ids == before + [-200] * 32 + after
    assert rendered.replace("<image>", "<ImageHere>") == f"###Human: <Img><ImageHere></Img> {QUESTION}###Assistant: "
    ref_logits, ref_tokens = ref.greedy(image, QUESTION, STEPS)
    with torch.inference_mode():
        features = model.backend.model.encode_image(_pixels(model, image))
        embeds = model.backend.model.splice(torch.tensor([ids]), features)
        ours = model.backend.model.text(embeds, model.backend.cache, 0, last_only=False)[0]
    assert ours.shape == ref_logits.shape
    assert (ours - ref_logits).abs().max() / ref_logits.abs().max() < 1e-5
    assert model.generate(image, QUESTION, max_new_tokens=STEPS, stop=()).token_ids == _until(ref_tokens, model)

    mirrored = image.transpose(0)  # FLIP_LEFT_RIGHT
    _, ref_mirrored = ref.greedy(mirrored, QUESTION, STEPS)
    assert ref_mirrored != ref_tokens
    assert model.generate(mirrored, QUESTION, max_new_tokens=STEPS, stop=()).token_ids == _until(ref_mirrored, model)


def _until(tokens, model):
    cut = next((i for i, t in enumerate(tokens) if t in model.stop_ids), len(tokens))
    return tokens[:cut]


def test_phi2_saved_by_newer_transformers_loads_the_same_model(loaded, tmp_path):
    """A Phi-2 folder with q/k/v apart (transformers >= 4.37) gives the same merged weights as the 4.36 one."""
    split = EdgeLMM.load(make_tiny_tinygptv(tmp_path / "split", seed=0, stage=3, fused=False))
    assert not any("query_key_value" in k for k in load_file(tmp_path / "split/phi-2/model-00001-of-00002.safetensors"))
    fused = loaded("s3")[0].backend.model.state_dict()
    for name, tensor in split.backend.model.state_dict().items():
        torch.testing.assert_close(tensor, fused[name], rtol=0, atol=1e-6, msg=name)


def test_cached_decode_equals_full_recomputation(loaded):
    model, _ = loaded("s4")
    image = sample_image(1)
    result = model.generate(image, QUESTION, max_new_tokens=STEPS, stop=())
    assert len(result.token_ids) > 4
    _, ids = model.prompt_ids(QUESTION)
    t = model.spec.text
    with torch.inference_mode():
        features = model.backend.model.encode_image(_pixels(model, image))
        for step, token in enumerate(result.token_ids):
            fresh = KVCache(t.num_layers, t.num_kv_heads, t.head_dim, len(ids) + step + 1)
            embeds = model.backend.model.splice(torch.tensor([ids + result.token_ids[:step]]), features)
            assert int(model.backend.model.text(embeds, fresh, start=0)[0, -1].argmax()) == token, f"step {step}"


def test_ask_cuts_the_answer_at_the_stop_string(loaded, monkeypatch):
    model, _ = loaded("s3")
    hash_id = model.tokenizer.encode("#", add_bos=False)
    assert len(hash_id) == 1
    head = model.backend.model.text.lm_head
    saved = head.weight.detach().clone(), head.bias.detach().clone()
    with torch.no_grad():  # a model that can only say "#": it must stop after "###"
        head.weight.zero_()
        head.bias.fill_(-1.0)[hash_id[0]] = 1.0
    try:
        result = model.generate(sample_image(), QUESTION, max_new_tokens=10)
    finally:
        with torch.no_grad():
            head.weight.copy_(saved[0])
            head.bias.copy_(saved[1])
    assert result.token_ids == hash_id * 3 and result.text == ""

    scripted = model.tokenizer.encode("A small dog###Human: more", add_bos=False)
    monkeypatch.setattr("edgelmm.api.generate_ids", lambda *args, **kwargs: iter(scripted))
    assert model.ask(sample_image(), QUESTION) == "A small dog"


def test_make_tiny_cli_writes_a_loadable_description(tmp_path, capsys):
    from edgelmm.cli import main

    assert main(["make-tiny", "tinygpt-v", str(tmp_path / "tiny")]) == 0
    path = capsys.readouterr().out.strip()
    assert path.endswith("tinygpt-v.json")
    assert EdgeLMM.load(path).spec.vision.num_image_tokens == 32


def _described(replicas, tmp_path, **changes):
    """A description file in tmp_path naming the stage-3 replica's pieces (absolute paths), with changes."""
    root = replicas["s3"].parent
    desc = json.loads(replicas["s3"].read_text())
    for key in ("checkpoint", "phi2", "eva_vit", "qformer", "qformer_config"):
        desc[key] = str(root / desc[key])
    desc.update(changes)
    path = tmp_path / "desc.json"
    path.write_text(json.dumps({k: v for k, v in desc.items() if v is not None}))
    return path


def _edited_pth(src, dst, edit):
    obj = torch.load(src)
    edit(obj.get("model", obj))
    torch.save(obj, dst)
    return str(dst)


@pytest.mark.parametrize("piece", ["checkpoint", "phi2", "eva_vit", "qformer", "qformer_config"])
def test_missing_piece_raises_checkpoint_error(replicas, tmp_path, piece):
    with pytest.raises(CheckpointError, match="not found"):
        EdgeLMM.load(_described(replicas, tmp_path, **{piece: str(tmp_path / "nowhere")}))


def test_description_errors(replicas, tmp_path):
    with pytest.raises(UnsupportedModelError):
        EdgeLMM.load(_described(replicas, tmp_path, format="minigpt4"))
    with pytest.raises(ConfigError, match="stage"):
        EdgeLMM.load(_described(replicas, tmp_path, stage=None))
    with pytest.raises(ConfigError, match="448"):
        EdgeLMM.load(_described(replicas, tmp_path, stage=4, image_size=224))
    for field, value in (("lora_alpha", float("nan")), ("lora_alpha", 0), ("lora_r", "64"), ("vision", [1408])):
        with pytest.raises(ConfigError, match=field):
            EdgeLMM.load(_described(replicas, tmp_path, **{field: value}))
    with pytest.raises(ConfigError, match="EvaConfig.heads is 0"):
        EdgeLMM.load(_described(replicas, tmp_path, vision={"heads": 0}))
    stage4 = replicas["s4"].parent / "TinyGPT-V_for_Stage4.pth"
    with pytest.raises(ConfigError, match="trained on 448x448"):  # a stage-4 checkpoint with a 224 description
        EdgeLMM.load(_described(replicas, tmp_path, checkpoint=str(stage4)))


def test_mismatched_pieces_raise_typed_errors(replicas, tmp_path):
    root = replicas["s3"].parent
    vision = json.loads(replicas["s3"].read_text())["vision"]
    with pytest.raises(ShapeMismatchError, match="eva_vit_g.pth"):  # EVA file narrower than described
        EdgeLMM.load(_described(replicas, tmp_path, vision={**vision, "width": 64}))
    with pytest.raises(CheckpointError, match="eva_vit_g.pth lacks"):  # fewer blocks than the model uses
        EdgeLMM.load(_described(replicas, tmp_path, vision={**vision, "depth": 6}))
    with pytest.raises(ShapeMismatchError, match="lora_r"):
        EdgeLMM.load(_described(replicas, tmp_path, lora_r=64))
    bert = json.loads((root / "bert-base-uncased" / "config.json").read_text())
    (tmp_path / "bert.json").write_text(json.dumps({**bert, "intermediate_size": 96}))
    with pytest.raises(ShapeMismatchError, match="blip2_pretrained_flant5xxl.pth"):
        EdgeLMM.load(_described(replicas, tmp_path, qformer_config=str(tmp_path / "bert.json")))
    blip2 = root / "blip2_pretrained_flant5xxl.pth"
    no_queries = _edited_pth(blip2, tmp_path / "q.pth", lambda m: m.pop("query_tokens"))
    with pytest.raises(CheckpointError, match="query_tokens"):
        EdgeLMM.load(_described(replicas, tmp_path, qformer=no_queries))
    ckpt = root / "TinyGPT-V_for_Stage3.pth"
    no_proj = _edited_pth(ckpt, tmp_path / "a.pth", lambda m: m.pop("llama_proj2.weight"))
    with pytest.raises(CheckpointError, match="llama_proj2"):
        EdgeLMM.load(_described(replicas, tmp_path, checkpoint=no_proj))
    half_lora = _edited_pth(ckpt, tmp_path / "b.pth", lambda m: m.pop(
        "llama_model.base_model.model.model.layers.1.self_attn.dense.lora_B.weight"))
    with pytest.raises(CheckpointError, match="lora_A but not its partner"):
        EdgeLMM.load(_described(replicas, tmp_path, checkpoint=half_lora))
    broken = tmp_path / "phi"
    shutil.copytree(root / "phi-2", broken)
    (broken / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing"):
        EdgeLMM.load(_described(replicas, tmp_path, phi2=str(broken)))


def test_tinygptv_refuses_what_it_cannot_export(tiny_checkpoint, tmp_path):
    """TinyGPT-V has no checkpoint folder a GPTQ loader reads, and --quantize-vision covers LLaVA towers only:
    both are clear errors that leave nothing behind."""
    src, rtn4 = tiny_checkpoint("tinygpt-v"), QuantSettings(bits=4, group_size=32, method="rtn")
    with pytest.raises(UnsupportedModelError, match="--format onnx"):
        export_gptq(src, tmp_path / "gptq", rtn4, progress=False)
    with pytest.raises(UnsupportedModelError, match="--quantize-vision"):
        export_onnx(src, tmp_path / "qv", dataclasses.replace(rtn4, quantize_vision=True), vision_bits=16,
                    progress=False)
    assert not list(tmp_path.iterdir())
