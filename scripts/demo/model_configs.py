"""The real configs of the launchers' default models, embedded so that sizes can be computed
where no model hub is reachable (scripts/bench/size_audit.py builds them on the meta device).

Each entry is the architecture part of the hub's `config.json` for that id, in the keys the
transformers config class takes, plus `torch_dtype`: the dtype the hub checkpoint stores its
weights in, which an export keeps. Nothing here is a weight.
"""
from __future__ import annotations

# ViT-L/16 at 384 px, both towers 24 layers x 1024 (the google/siglip-large-patch16-384 shape,
# which the XraySigLIP checkpoint keeps): 652,478,466 parameters.
SIGLIP_L16_384 = {
    "model_type": "siglip",
    "text_config": {"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16,
                    "num_hidden_layers": 24, "vocab_size": 32000, "max_position_embeddings": 64},
    "vision_config": {"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16,
                      "num_hidden_layers": 24, "image_size": 384, "patch_size": 16},
    "torch_dtype": "float32",
}

# So400m/14 at 384 px: shape-optimised width 1152, MLP 4304, 27 layers per tower.
SIGLIP_SO400M_384 = {
    "model_type": "siglip",
    "text_config": {"hidden_size": 1152, "intermediate_size": 4304, "num_attention_heads": 16,
                    "num_hidden_layers": 27, "vocab_size": 32000, "max_position_embeddings": 64},
    "vision_config": {"hidden_size": 1152, "intermediate_size": 4304, "num_attention_heads": 16,
                      "num_hidden_layers": 27, "image_size": 384, "patch_size": 14},
    "torch_dtype": "float32",
}

SIGLIP_B16_224 = {
    "model_type": "siglip",
    "text_config": {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12,
                    "num_hidden_layers": 12, "vocab_size": 32000, "max_position_embeddings": 64},
    "vision_config": {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12,
                      "num_hidden_layers": 12, "image_size": 224, "patch_size": 16},
    "torch_dtype": "float32",
}

GEMMA3_1B = {
    "model_type": "gemma3_text",
    "vocab_size": 262144,
    "hidden_size": 1152,
    "intermediate_size": 6912,
    "num_hidden_layers": 26,
    "num_attention_heads": 4,
    "num_key_value_heads": 1,
    "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh",
    "max_position_embeddings": 32768,
    "query_pre_attn_scalar": 256,
    "rms_norm_eps": 1e-6,
    "sliding_window": 512,
    "attention_bias": False,
    "tie_word_embeddings": True,
    "bos_token_id": 2,
    "eos_token_id": [1, 106],
    "pad_token_id": 0,
    "torch_dtype": "bfloat16",
}

# The language models of the larger Gemma 3 checkpoints (google/gemma-3-{4b,12b,27b}-it are
# Gemma3ForConditionalGeneration; these are their text_config architectures). MedGemma 4B and
# 27B have exactly these shapes (ALIASES).
_GEMMA3_TEXT = {
    "model_type": "gemma3_text", "vocab_size": 262208, "hidden_activation": "gelu_pytorch_tanh",
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-6, "sliding_window": 1024, "attention_bias": False,
    "tie_word_embeddings": True, "bos_token_id": 2, "eos_token_id": [1, 106], "pad_token_id": 0,
    "torch_dtype": "bfloat16",
}
GEMMA3_4B = {**_GEMMA3_TEXT, "hidden_size": 2560, "intermediate_size": 10240, "num_hidden_layers": 34,
             "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "query_pre_attn_scalar": 256}
GEMMA3_12B = {**_GEMMA3_TEXT, "hidden_size": 3840, "intermediate_size": 15360, "num_hidden_layers": 48,
              "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 256, "query_pre_attn_scalar": 256}
GEMMA3_27B = {**_GEMMA3_TEXT, "hidden_size": 5376, "intermediate_size": 21504, "num_hidden_layers": 62,
              "num_attention_heads": 32, "num_key_value_heads": 16, "head_dim": 128, "query_pre_attn_scalar": 168}

# Gemma 3 multimodal checkpoints (Gemma3ForConditionalGeneration), which Stage2 fine-tunes as they
# ship (--base_vlm): google/gemma-3-{4b,12b,27b}-it and google/medgemma-{4b,27b}-it share one
# vision tower, SigLIP So400m/14 at 896 px without its pooling head (a 64x64 patch grid, pooled to
# 256 image tokens), stored in bf16 with the LM.
_GEMMA3_VISION_896 = {"model_type": "siglip_vision_model", "hidden_size": 1152, "intermediate_size": 4304,
                      "num_attention_heads": 16, "num_hidden_layers": 27, "image_size": 896, "patch_size": 14,
                      "vision_use_head": False, "layer_norm_eps": 1e-6}


def _gemma3_vlm(text: dict) -> dict:
    return {"model_type": "gemma3", "mm_tokens_per_image": 256, "boi_token_index": 255999,
            "eoi_token_index": 256000, "image_token_index": 262144, "tie_word_embeddings": True,
            "vision_config": _GEMMA3_VISION_896,
            "text_config": {k: v for k, v in text.items() if k != "torch_dtype"}, "torch_dtype": "bfloat16"}


LLAMA3_8B = {
    "model_type": "llama",
    "vocab_size": 128256,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "hidden_act": "silu",
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "attention_bias": False,
    "mlp_bias": False,
    "tie_word_embeddings": False,
    "bos_token_id": 128000,
    "eos_token_id": 128009,
    "torch_dtype": "bfloat16",
}

# RAD-DINO is a DINOv2 ViT-B/14 whose position table is sized for 518 px.
RAD_DINO = {
    "model_type": "dinov2",
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "mlp_ratio": 4,
    "image_size": 518,
    "patch_size": 14,
    "layerscale_value": 1.0,
    "layer_norm_eps": 1e-6,
    "qkv_bias": True,
    "use_swiglu_ffn": False,
    "torch_dtype": "float32",
}

# Merlin's I3ResNet-152 (Stage0.merlin.MerlinBackbone's defaults are this architecture); the
# release is a torch state dict in float32.
MERLIN_I3RESNET152 = {
    "model_type": "merlin",
    "layers": [3, 8, 36, 3],
    "width": 64,
    "num_classes": 1692,
    "torch_dtype": "float32",
}

# The whole multimodal checkpoints, by the ids --base_vlm takes.
BASE_VLM_CONFIGS = {
    "google/medgemma-4b-it": _gemma3_vlm(GEMMA3_4B),
    "google/medgemma-27b-it": _gemma3_vlm(GEMMA3_27B),
    "google/gemma-3-4b-it": _gemma3_vlm(GEMMA3_4B),
    "google/gemma-3-12b-it": _gemma3_vlm(GEMMA3_12B),
    "google/gemma-3-27b-it": _gemma3_vlm(GEMMA3_27B),
}

CONFIGS = {
    "StanfordAIMI/XraySigLIP__vit-l-16-siglip-384__webli": SIGLIP_L16_384,
    "google/siglip-so400m-patch14-384": SIGLIP_SO400M_384,
    "google/siglip-base-patch16-224": SIGLIP_B16_224,
    "google/gemma-3-1b-it": GEMMA3_1B,
    "google/gemma-3-4b-it": GEMMA3_4B,
    "google/gemma-3-12b-it": GEMMA3_12B,
    "google/gemma-3-27b-it": GEMMA3_27B,
    "meta-llama/Meta-Llama-3-8B-Instruct": LLAMA3_8B,
    "microsoft/rad-dino": RAD_DINO,
    "merlin": MERLIN_I3RESNET152,
}

# Ids whose weights have the shapes of another entry: an LLM2Vec MNTP adapter is merged into
# the base LLM it names, so the text tower is that LLM's shape.
ALIASES = {
    "McGill-NLP/LLM2Vec-Meta-Llama-3-8B-Instruct-mntp": "meta-llama/Meta-Llama-3-8B-Instruct",
    "google/medgemma-4b-it": "google/gemma-3-4b-it",
    "google/medgemma-27b-it": "google/gemma-3-27b-it",
}


def config_for(name: str) -> tuple[str, dict]:
    """(hub id, embedded config) for a launcher's model name; a name with none is an error that
    says where to add it, rather than a silent guess at its size."""
    hub_id = ALIASES.get(name, name)
    if hub_id not in CONFIGS:
        raise KeyError(f"no embedded config for {name!r}: add its config.json's architecture keys to "
                       "scripts/demo/model_configs.py (CONFIGS) to audit this launcher")
    return hub_id, CONFIGS[hub_id]
