"""projectors.py and vlm.py: VLM assembly, image-token counts, export round trip, supervised-only LM loss.

All towers are tiny config-built models with random weights (no download)."""
import json
import shutil
import warnings

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import (
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    BitImageProcessor,
    Dinov2Config,
    Dinov2Model,
    LlavaConfig,
    LlavaForConditionalGeneration,
    SiglipModel,
    SiglipVisionModel,
)
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

from projectors import MLPProjector, load_projector
from scripts.demo.make_tiny_models import build_tiny_gemma3, build_tiny_siglip
from vision_tower import load_vision_tower
from vlm import build_vlm, lm_loss_on_supervised, load_vlm, save_vlm

TEXTS = ["FINDINGS: The heart is normal in size. No pleural effusion. IMPRESSION: Normal chest.",
         "FINDINGS: Cardiomegaly. Small left pleural effusion. IMPRESSION: Cardiomegaly with effusion."] * 10
IMAGE, PATCH = 32, 8
N_PATCHES = (IMAGE // PATCH) ** 2


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_models")
    siglip = build_tiny_siglip(root / "siglip", TEXTS, image_size=IMAGE, patch_size=PATCH, hidden_size=32,
                               num_layers=2, num_heads=2, vocab_size=300)
    gemma = build_tiny_gemma3(root / "gemma3", TEXTS, hidden_size=48, num_layers=2, num_heads=2, vocab_size=300)
    return {"root": root, "siglip": siglip, "gemma3": gemma}


@pytest.fixture(scope="module")
def vlm(tiny):
    torch.manual_seed(0)
    return build_vlm(tiny["siglip"], tiny["gemma3"])


def _inputs(model, tokenizer, batch=2, text="FINDINGS: The heart"):
    ids = [tokenizer.bos_token_id] + [model.config.image_token_index] * model.config.image_seq_length
    ids += tokenizer(text, add_special_tokens=False)["input_ids"]
    input_ids = torch.tensor([ids] * batch)
    torch.manual_seed(1)
    return input_ids, torch.randn(batch, 3, IMAGE, IMAGE)


# ---------------------------------------------------------------- projector

def test_mlp_projector_uses_llava_names():
    cfg = LlavaConfig(vision_config={"model_type": "siglip_vision_model", "hidden_size": 32},
                      text_config={"model_type": "gemma3_text", "hidden_size": 48})
    llava = LlavaMultiModalProjector(cfg)
    proj = MLPProjector(32, 48, depth=2)
    assert proj.state_dict().keys() == llava.state_dict().keys()
    llava.load_state_dict(proj.state_dict(), strict=True)
    x = torch.randn(3, 5, 32)
    torch.testing.assert_close(llava(x), proj(x), rtol=0, atol=0)
    assert list(MLPProjector(32, 48, depth=1).state_dict()) == ["linear_1.weight", "linear_1.bias"]
    deep = MLPProjector(32, 48, depth=3)
    assert "linear_3.weight" in deep.state_dict() and deep(x).shape == (3, 5, 48)
    with pytest.raises(ValueError):
        MLPProjector(32, 48, depth=0)


# ---------------------------------------------------------------- assembly

def test_build_vlm_copies_every_pretrained_weight(tiny, vlm):
    model, tokenizer, _ = vlm
    assert isinstance(model, LlavaForConditionalGeneration)
    tower = SiglipVisionModel.from_pretrained(tiny["siglip"])
    lm = AutoModelForCausalLM.from_pretrained(tiny["gemma3"])
    for k, v in tower.state_dict().items():
        assert torch.equal(model.model.vision_tower.state_dict()[k], v), k
    for k, v in lm.model.state_dict().items():
        assert torch.equal(model.model.language_model.state_dict()[k], v), k
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight  # tied, like Gemma3
    assert tokenizer.convert_ids_to_tokens(model.config.image_token_index) == "<image_soft_token>"
    assert not any(p.is_meta for p in model.parameters())


def test_siglip_gives_one_image_token_per_patch(vlm):
    model, tokenizer, image_processor = vlm
    assert model.config.vision_feature_select_strategy == "full"  # SigLIP has no CLS to drop
    assert model.config.image_seq_length == N_PATCHES
    pixels = image_processor(images=Image.new("RGB", (50, 40)), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        feats = model.model.get_image_features(pixel_values=pixels).pooler_output
    assert feats[0].shape == (N_PATCHES, model.config.text_config.hidden_size)


def test_dinov2_drops_cls_and_keeps_every_patch(tiny):
    path = tiny["root"] / "dinov2"
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                             image_size=IMAGE, patch_size=PATCH)).save_pretrained(path)
    BitImageProcessor(size={"shortest_edge": IMAGE}, crop_size={"height": IMAGE, "width": IMAGE}).save_pretrained(path)
    tower, has_cls = load_vision_tower(path)
    assert has_cls and isinstance(tower, Dinov2Model)
    model, _, image_processor = build_vlm(path, tiny["gemma3"])
    assert model.config.vision_feature_select_strategy == "default"
    assert model.config.image_seq_length == N_PATCHES
    pixels = image_processor(images=Image.new("RGB", (50, 40)), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        assert tower(pixels).last_hidden_state.shape[1] == N_PATCHES + 1  # CLS + patches
        feats = model.model.get_image_features(pixel_values=pixels).pooler_output
    assert feats[0].shape[0] == N_PATCHES


def test_stage0_vision_encoder_bin_loads_strictly(tiny, tmp_path):
    siglip = SiglipModel.from_pretrained(tiny["siglip"])
    folder = tmp_path / "stage0_final"
    folder.mkdir()
    torch.save(siglip.vision_model.state_dict(), folder / "vision_encoder.bin")
    shutil.copy(tiny["siglip"] / "config.json", folder / "config.json")
    tower, has_cls = load_vision_tower(folder)
    assert not has_cls
    for k, v in siglip.vision_model.state_dict().items():
        assert torch.equal(tower.state_dict()[k], v), k
    state = siglip.vision_model.state_dict()
    state.pop(next(iter(state)))
    torch.save(state, folder / "vision_encoder.bin")
    with pytest.raises(RuntimeError, match="Missing key"):
        load_vision_tower(folder)


# ---------------------------------------------------------------- loss

def test_lm_loss_on_supervised_equals_full_logits(vlm):
    model, tokenizer, _ = vlm
    input_ids, pixels = _inputs(model, tokenizer, batch=3)
    labels = input_ids.clone()
    labels[:, : 1 + model.config.image_seq_length] = -100
    labels[1, -2:] = -100  # a padded row
    mask = torch.ones_like(input_ids)
    mask[1, -2:] = 0
    with torch.no_grad():
        ours = lm_loss_on_supervised(model, input_ids, mask, pixels, labels)
        out = model(input_ids=input_ids, attention_mask=mask, pixel_values=pixels, labels=labels)
        full = F.cross_entropy(out.logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
    torch.testing.assert_close(ours, full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours, out.loss, rtol=1e-5, atol=1e-5)
    model.config.text_config.final_logit_softcapping = 2.0
    try:
        with torch.no_grad():
            capped = lm_loss_on_supervised(model, input_ids, mask, pixels, labels)
        logits = torch.tanh(out.logits.float() / 2.0) * 2.0
        full = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        torch.testing.assert_close(capped, full, rtol=1e-5, atol=1e-5)
    finally:
        model.config.text_config.final_logit_softcapping = None


# ---------------------------------------------------------------- export

def test_export_round_trip(vlm, tmp_path):
    model, tokenizer, image_processor = vlm
    out = save_vlm(model, tokenizer, image_processor, tmp_path / "vlm")
    loaded = AutoModelForImageTextToText.from_pretrained(out)
    assert type(loaded) is LlavaForConditionalGeneration
    input_ids, pixels = _inputs(model, tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=input_ids, pixel_values=pixels).logits,
                                   model(input_ids=input_ids, pixel_values=pixels).logits, rtol=0, atol=0)
        kw = dict(input_ids=input_ids[:1], pixel_values=pixels[:1], max_new_tokens=6, do_sample=False)
        assert torch.equal(loaded.generate(**kw), model.generate(**kw))
    proj = load_projector(out)
    assert json.loads((out / "projection_layer" / "config.json").read_text())["depth"] == 2
    for k, v in proj.state_dict().items():
        assert torch.equal(v, model.model.multi_modal_projector.state_dict()[k])
    processor = AutoProcessor.from_pretrained(out)
    enc = processor(images=Image.new("RGB", (40, 40)), text=processor.image_token + "FINDINGS:", return_tensors="pt")
    assert (enc["input_ids"] == model.config.image_token_index).sum() == N_PATCHES
    with torch.no_grad():
        assert loaded(**enc).logits.shape[1] == enc["input_ids"].shape[1]


def test_deeper_projector_warns_at_export_and_reloads(tiny, tmp_path):
    model, tokenizer, image_processor = build_vlm(tiny["siglip"], tiny["gemma3"], projector_depth=3)
    with pytest.warns(UserWarning, match="does NOT load with plain transformers"):
        out = save_vlm(model, tokenizer, image_processor, tmp_path / "deep")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded, _, _ = load_vlm(out)
    input_ids, pixels = _inputs(model, tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=input_ids, pixel_values=pixels).logits,
                                   model(input_ids=input_ids, pixel_values=pixels).logits, rtol=0, atol=0)


def test_export_decodes_greedily_like_the_cli_and_keeps_the_base_sampling_settings(tiny, tmp_path):
    """An `-it` LM ships a sampling generation config (do_sample, top_k 64, top_p 0.95). The
    export's default must be the CLI's decoding, so that `model.generate(**inputs)` with no
    decoding arguments answers as the CLI does; the base's settings stay under a known name."""
    from transformers import GenerationConfig

    from cli import DEFAULT_MAX_NEW_TOKENS
    from vlm import SAMPLING_CONFIG
    lm_dir = tmp_path / "gemma3_it"
    shutil.copytree(tiny["gemma3"], lm_dir)
    GenerationConfig(do_sample=True, top_k=64, top_p=0.95, bos_token_id=2, eos_token_id=[1, 106],
                     pad_token_id=0).save_pretrained(lm_dir)
    torch.manual_seed(0)
    model, tok, ip = build_vlm(tiny["siglip"], lm_dir)
    out = save_vlm(model, tok, ip, tmp_path / "vlm")
    gen = GenerationConfig.from_pretrained(out)
    assert gen.do_sample is False and gen.num_beams == 1 and gen.max_new_tokens == DEFAULT_MAX_NEW_TOKENS
    base = GenerationConfig.from_pretrained(out, SAMPLING_CONFIG)
    assert base.do_sample is True and base.top_k == 64 and base.top_p == 0.95
    loaded = AutoModelForImageTextToText.from_pretrained(out).eval()
    ids, pixels = _inputs(loaded, tok, batch=1)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels}
    with torch.no_grad():
        runs = [loaded.generate(**inputs, max_new_tokens=8) for _ in range(3)]
        greedy = loaded.generate(**inputs, max_new_tokens=8, do_sample=False, num_beams=1)
    assert all(torch.equal(r, greedy) for r in runs)
