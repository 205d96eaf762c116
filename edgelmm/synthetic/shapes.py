"""Model shapes: the config.json each family's released checkpoints write, at tiny sizes (for make-tiny and
tests) or at the released sizes (for benchmarks and memory plans of models not on disk)."""
from __future__ import annotations

TINY = {
    "siglip": {"model_type": "siglip_vision_model", "hidden_size": 72, "intermediate_size": 144,
               "num_hidden_layers": 3, "num_attention_heads": 1, "patch_size": 14, "image_size": 384,
               "layer_norm_eps": 1e-6, "hidden_act": "gelu_pytorch_tanh", "num_channels": 3},
    "clip": {"model_type": "clip_vision_model", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3,
             "num_attention_heads": 1, "patch_size": 14, "image_size": 336, "layer_norm_eps": 1e-5,
             "hidden_act": "quick_gelu", "projection_dim": 32},
    "phi": {"model_type": "phi", "hidden_size": 160, "intermediate_size": 320, "num_hidden_layers": 2,
            "num_attention_heads": 2, "num_key_value_heads": 2, "partial_rotary_factor": 0.4,
            "hidden_act": "gelu_new", "layer_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 2048,
            "tie_word_embeddings": False, "qk_layernorm": False, "resid_pdrop": 0.1},
    "llama": {"model_type": "llama", "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
              "num_attention_heads": 2, "num_key_value_heads": 1, "hidden_act": "silu", "rms_norm_eps": 1e-5,
              "rope_theta": 10000.0, "max_position_embeddings": 2048, "tie_word_embeddings": False},
    "gemma": {"model_type": "gemma", "hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 64, "hidden_act": "gelu",
              "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 2048,
              "tie_word_embeddings": True},
}
TINY["qwen2"] = {**TINY["llama"], "model_type": "qwen2", "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
                 "use_sliding_window": False}

FULL = {  # the released models' sizes (docs/model-formats.md §1-§4)
    "siglip": {**TINY["siglip"], "hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27,
               "num_attention_heads": 16},
    "clip": {**TINY["clip"], "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
             "num_attention_heads": 16, "projection_dim": 768},
    "phi": {**TINY["phi"], "hidden_size": 2560, "intermediate_size": 10240, "num_hidden_layers": 32,
            "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 51200},
    "llama": {**TINY["llama"], "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22,
              "num_attention_heads": 32, "num_key_value_heads": 4, "vocab_size": 32000},
    "gemma": {**TINY["gemma"], "hidden_size": 2048, "intermediate_size": 16384, "num_hidden_layers": 18,
              "num_attention_heads": 8, "num_key_value_heads": 1, "head_dim": 256, "max_position_embeddings": 8192,
              "vocab_size": 256000},
    "qwen2": {**TINY["qwen2"], "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
              "num_attention_heads": 14, "num_key_value_heads": 2, "max_position_embeddings": 32768,
              "vocab_size": 151936, "tie_word_embeddings": True},
}

# TinyLLaVA Factory language models: (config key, llm_model_name_or_path, tiny tokenizer style)
FACTORY_LLMS = {"phi": ("microsoft/phi-2", "phi2"), "llama": ("TinyLlama/TinyLlama-1.1B-Chat-v1.0", "llama"),
                "gemma": ("google/gemma-2b-it", "gemma"), "qwen2": ("Qwen/Qwen2-0.5B", "phi2")}

# Named full-size shapes: (replica, Factory LLM, vocabulary size)
SHAPES = {"tinyllava-phi2-siglip-3.1b": ("tinyllava", "phi", 51200), "mipha-3b": ("mipha", "phi", 51200),
          "llava-gemma-2b": ("llava-gemma", "phi", 256000), "tiny-llava-1.1b": ("tiny-llava-hf", "phi", 32064)}

# Hub names of the released checkpoints → their shapes, so `edgelmm plan Mipha-3B` works with nothing on disk
SHAPE_ALIASES = {"tinyllava-phi-2-siglip-3.1b": "tinyllava-phi2-siglip-3.1b", "tinyllava-3.1b": "tinyllava-phi2-siglip-3.1b",
                 "mipha-3b": "mipha-3b", "llava-gemma-2b": "llava-gemma-2b", "tiny-llava-v1-hf": "tiny-llava-1.1b",
                 "tinygpt-v": "tinygpt-v", **{name: name for name in SHAPES}}

SIGLIP_PROCESSOR = {"image_processor_type": "SiglipImageProcessor", "do_resize": True,
                    "size": {"height": 384, "width": 384}, "resample": 3, "do_rescale": True,
                    "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}
CLIP_PROCESSOR = {"image_processor_type": "CLIPImageProcessor", "do_resize": True, "size": {"shortest_edge": 336},
                  "resample": 3, "do_center_crop": True, "crop_size": {"height": 336, "width": 336},
                  "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "do_convert_rgb": True,
                  "image_mean": [0.48145466, 0.4578275, 0.40821073],
                  "image_std": [0.26862954, 0.26130258, 0.27577711]}


def checkpoint_config(family: str, vocab: int, ids: dict, llm: str, sizes: dict) -> dict:
    """config.json as the released checkpoint replica ``family`` (``replicas.REPLICAS``) writes it, at ``sizes`` (TINY or FULL); ``ids`` holds
    the tokenizer's bos/eos/pad(/image) ids."""
    siglip, phi = sizes["siglip"], sizes["phi"]
    if family == "tinyllava":
        text, (llm_name, _) = sizes[llm], FACTORY_LLMS[llm]
        return {"architectures": ["TinyLlavaForConditionalGeneration"], "model_type": "tinyllava",
                "llm_model_name_or_path": llm_name, "vision_model_name_or_path": "google/siglip-so400m-patch14-384",
                "connector_type": "mlp2x_gelu", "hidden_size": text["hidden_size"], "image_aspect_ratio": "square",
                "image_token_index": -200, "ignore_index": -100, "vision_feature_layer": -2,
                "vision_feature_select_strategy": "patch", "vision_hidden_size": siglip["hidden_size"],
                "pad_token": "<|endoftext|>", "pad_token_id": ids["pad"], "tokenizer_model_max_length": 3072,
                "tokenizer_padding_side": "right", "tokenizer_use_fast": False, "torch_dtype": "float16",
                "text_config": {**text, "vocab_size": vocab}, "vision_config": siglip,
                "num_queries": 128, "num_resampler_layers": 3}
    if family == "tinyllava-legacy":
        return {**phi, "architectures": ["TinyLlavaPhiForCausalLM"], "model_type": "tiny_llava_phi",
                "vocab_size": vocab, "mm_vision_tower": "bczhou/TinyLLaVA-3.1B-SigLIP",
                "mm_hidden_size": siglip["hidden_size"], "mm_projector_type": "mlp2x_gelu",
                "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch", "mm_patch_merge_type": "flat",
                "image_aspect_ratio": "pad", "mm_use_im_start_end": False, "mm_use_im_patch_token": False,
                "tokenizer_model_max_length": 3072, "tokenizer_padding_side": "right", "pad_token": "<|endoftext|>",
                "pad_token_id": ids["pad"], "bos_token_id": ids["bos"], "eos_token_id": ids["eos"],
                "torch_dtype": "float32"}
    if family == "mipha":
        vision = {**siglip, "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch",
                  "vision_model_name_or_path": "google/siglip-so400m-patch14-384"}
        return {**phi, "architectures": ["MiphaPhiForCausalLM"], "model_type": "mipha_phi", "vocab_size": vocab,
                "image_aspect_ratio": "pad", "freeze_vision_tower": False, "tune_mm_mlp_adapter": True,
                "mm_use_im_start_end": False, "mm_use_im_patch_token": False, "tokenizer_model_max_length": 2048,
                "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16",
                "vision_config": {"vision_tower": vision, "mm_projector": {
                    "mm_projector_type": "mlp2x_gelu", "mm_hidden_size": siglip["hidden_size"],
                    "hidden_size": phi["hidden_size"]}}}
    text = sizes["gemma"] if family == "llava-gemma" else sizes["llama"]
    return {"architectures": ["LlavaForConditionalGeneration"], "model_type": "llava",
            "image_token_index": ids["image"], "pad_token_id": ids["pad"], "projector_hidden_act": "gelu",
            "vision_feature_layer": -2, "vision_feature_select_strategy": "default", "ignore_index": -100,
            "text_config": {**text, "vocab_size": vocab, "bos_token_id": ids["bos"], "eos_token_id": ids["eos"]},
            "vision_config": sizes["clip"], "torch_dtype": "float32", "tie_word_embeddings": text["tie_word_embeddings"]}


def shape_config(name: str) -> dict:
    """The full-size config.json of a named shape (token ids as in the released tokenizers)."""
    family, llm, vocab = SHAPES[name]
    ids = {"llava-gemma": {"bos": 2, "eos": 1, "pad": 0, "image": 256000},
           "tiny-llava-hf": {"bos": 1, "eos": 2, "pad": 32001, "image": 32000}}.get(
        family, {"bos": 50256, "eos": 50256, "pad": 50256})
    if family == "llava-gemma":
        vocab = 256000 + 64  # the converted checkpoint appends <image> and pads the embedding
    return checkpoint_config(family, vocab, ids, llm, FULL)
