"""Memory and disk sizes of every launcher's default run, without loading a weight.

    python scripts/bench/size_audit.py                       # Markdown table on stdout
    python scripts/bench/size_audit.py --json runs/sizes.json --gpu_gb 80 --num_gpus 8

Each launcher's default models are built from their real configs (scripts/demo/model_configs.py) on
the meta device, with what trains set as the trainers set it; the launchers' VAR blocks give the
batch size, lengths, LoRA rank and precision. Per GPU, for one GPU, DDP and DeepSpeed ZeRO-2 on
N GPUs (bf16 mixed precision, AdamW):

  trained parameter   4 B fp32 weight + 4 B gradient + 8 B AdamW state; under torch autocast
                      (one GPU, DDP) also the 2 B bf16 copy autocast keeps for backward
  frozen parameter    2 B (stored in bf16; 4 B without bf16)
  DDP                 + 4 B per trained parameter: the reducer's gradient buckets
  ZeRO-2              gradients and AdamW state divided by N; weights are not sharded
  FSDP2               weights, gradients and AdamW state divided by N, plus the units gathered
                      whole in the compute dtype: what no transformer block holds (embeddings,
                      the LM head: the root unit, kept through the step) and two blocks (the one
                      running and the one prefetched), blocks being the model's
                      `_no_split_modules`; no autocast copies (FSDP casts when it gathers).
                      Stage0 wraps each tower's backbone as a unit of its own too (what its blocks
                      leave is gathered only while it runs); counted as root here, an upper bound
  activations         an ESTIMATE, kept only in the towers gradients flow through (a frozen
                      tower whose output is only an input, or whose text features are cached,
                      keeps none), no gradient checkpointing, SDPA/flash attention (no score
                      matrix): per transformer layer and token 2 B x (4h + 2q + 2kv + m*i), h the
                      width, q/kv the query/key-value widths, i the MLP width, m = 2 for a GELU
                      MLP and 4 for a gated one; LoRA dropout adds each adapted layer's input;
                      an LM loss 12 B x vocabulary per supervised token (fp32 log-softmax kept,
                      transient logits and their gradient); Merlin's 3D ResNet: every layer's
                      output from a shape-only forward, its four stages checkpointed (stem and
                      stage outputs kept, the largest stage recomputed in backward)
  fits                the total within (1 - headroom) of --gpu_gb GiB (CUDA context, allocator
                      fragmentation and communication buffers take the rest)

A resume checkpoint holds the trained tensors (fp32), their AdamW state, the buffers of trained
modules (BatchNorm statistics) and small state (RNG, scheduler, counters: SMALL_STATE_BYTES),
never a frozen tensor. An export is the full model in its storage dtype: each part in the dtype
its checkpoint stores (Gemma 3, Llama 3: bf16; SigLIP, RAD-DINO, Merlin, new heads: fp32), the
Stage1 VLM all in the LM's bf16.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GIB = 2 ** 30
SMALL_STATE_BYTES = 2 ** 20  # RNG states of every process, scheduler, step counters: well under 1 MiB
FP32, BF16 = 4, 2
ADAM_BYTES, GRAD_BYTES, AUTOCAST_COPY_BYTES, DDP_BUCKET_BYTES = 8, 4, 2, 4
LM_LOSS_BYTES_PER_LOGIT = 12
# Stage2's prompt wraps the image and question in Gemma's turn markers:
# <bos><start_of_turn>user\n ... <end_of_turn>\n<start_of_turn>model\n
GEMMA_TURN_TOKENS = 7
# LoRA on the CT text tower: every linear layer of the decoder, as LLM2Vec's supervised stage
# adapts its 8B towers (r 16, alpha 2r, dropout 0.05).
CT_LORA = {"r": 16, "alpha": 32.0, "dropout": 0.05,
           "targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
ENGINES = ("one_gpu", "ddp", "zero2", "fsdp2")
WORKING_ENGINES = ("one_gpu", "ddp", "zero2", "fsdp2")  # what the trainers run: the verdicts name only these
SHARDED = ("zero2", "fsdp2")
GPU_COUNTS = (1, 2, 4, 8, 16, 32, 64, 128)  # for "how many GPUs does this engine need"

LAUNCHERS = {
    "stage0": "Stage0/run_train_vision_encoder_stage0.sh",
    "stage1": "scripts/run_stage1.sh",
    "stage2": "scripts/run_stage2.sh",
    "knee": "scripts/run_knee_raddino.sh",
    "ct": "scripts/run_ct_clip.sh",
    "derm": "scripts/run_derm_lora.sh",
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpu_gb", type=float, default=80.0,
                   help="GPU memory for the fits column, in GiB (an '80 GB' H100 holds 79.6 GiB)")
    p.add_argument("--num_gpus", type=int, default=8, help="N of the ZeRO-2 (and DDP) column")
    p.add_argument("--headroom", type=float, default=0.10,
                   help="fraction of the GPU kept free for the CUDA context, fragmentation and buffers")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the audit as JSON here")
    args = p.parse_args(argv)
    if args.num_gpus < 1 or args.gpu_gb <= 0 or not 0 <= args.headroom < 1:
        p.error("--num_gpus must be >= 1, --gpu_gb > 0 and --headroom in [0, 1)")
    return args


# ---------------------------------------------------------------- launchers

_VAR = re.compile(r'^:\s*"\$\{(\w+):=([^}]*)\}"')


def launcher_defaults(path) -> dict[str, str]:
    """The literal defaults of a launcher's `: "${VAR:=value}"` block; computed ones ($(...),
    ${OTHER}) are left out, so a value here is exactly what the launcher passes."""
    out = {}
    for line in Path(path).read_text().splitlines():
        m = _VAR.match(line.strip())
        if m and "$" not in m.group(2):
            out[m.group(1)] = m.group(2)
    return out


def _launcher(key, root=ROOT) -> dict[str, str]:
    return launcher_defaults(Path(root) / LAUNCHERS[key])


# ---------------------------------------------------------------- building on meta

def _config(cfg: dict):
    from transformers import Dinov2Config, Gemma3TextConfig, LlamaConfig, SiglipConfig
    classes = {"siglip": SiglipConfig, "gemma3_text": Gemma3TextConfig, "llama": LlamaConfig,
               "dinov2": Dinov2Config}
    kw = {k: v for k, v in cfg.items() if k not in ("model_type", "torch_dtype")}
    return classes[cfg["model_type"]](**kw)


def _meta():
    from accelerate import init_empty_weights
    return init_empty_weights(include_buffers=True)


def _tie(model):
    """Tie the LM head to the input embeddings the way the checkpoint does (one tensor)."""
    if model.config.get_text_config().tie_word_embeddings:
        model.get_output_embeddings().weight = model.get_input_embeddings().weight
    return model


def build_hf(name: str, kind: str = "base"):
    """An embedded config's model on the meta device: kind "base" (AutoModel: a SiglipModel, a
    LlamaModel without LM head, a Dinov2Model), "causal_lm", or a SigLIP's "vision" / "text" half."""
    from transformers import AutoModel, AutoModelForCausalLM, SiglipTextModel, SiglipVisionModel

    from scripts.demo.model_configs import config_for
    _, cfg = config_for(name)
    config = _config(cfg)
    with _meta():
        if kind == "causal_lm":
            return _tie(AutoModelForCausalLM.from_config(config))
        if kind == "vision":
            return SiglipVisionModel._from_config(config.vision_config)
        if kind == "text":
            return SiglipTextModel._from_config(config.text_config)
        return AutoModel.from_config(config)


def build_vlm(vision_name: str, llm_name: str):
    """LlavaForConditionalGeneration(SigLIP vision tower, 2-layer MLP projector, Gemma 3), as
    vlm.build_vlm assembles it, on the meta device."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    from scripts.demo.model_configs import config_for
    vision = _config(config_for(vision_name)[1]).vision_config
    text = _config(config_for(llm_name)[1])
    config = LlavaConfig(vision_config=vision.to_dict(), text_config=text.to_dict(),
                         image_token_index=text.vocab_size - 1,  # the placeholder's id changes no size
                         image_seq_length=num_patches(vision), vision_feature_select_strategy="full",
                         vision_feature_layer=-1, projector_hidden_act="gelu", multimodal_projector_bias=True,
                         tie_word_embeddings=text.tie_word_embeddings)
    with _meta():
        model = LlavaForConditionalGeneration(config)
    if text.tie_word_embeddings:
        model.lm_head.weight = model.model.language_model.embed_tokens.weight
    return model


def build_base_vlm(name: str):
    """A Gemma3ForConditionalGeneration (MedGemma, Gemma 3 4B+) from its embedded config, on meta."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    from scripts.demo.model_configs import BASE_VLM_CONFIGS
    if name not in BASE_VLM_CONFIGS:
        raise KeyError(f"no embedded config for --base_vlm {name!r}: add it to scripts/demo/model_configs.py "
                       "(BASE_VLM_CONFIGS)")
    cfg = {k: v for k, v in BASE_VLM_CONFIGS[name].items() if k not in ("model_type", "torch_dtype")}
    with _meta():
        model = Gemma3ForConditionalGeneration(Gemma3Config(**cfg))
    model.lm_head.weight = model.model.language_model.embed_tokens.weight
    return model


def num_patches(vision_config, image_size=None) -> int:
    return ((image_size or vision_config.image_size) // vision_config.patch_size) ** 2


def _lora(module, *, r, alpha, dropout, targets):
    from peft import LoraConfig, inject_adapter_in_model
    with _meta():
        inject_adapter_in_model(LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, bias="none",
                                           target_modules=targets), module)
    for n, p in module.named_parameters():
        p.requires_grad_("lora_" in n)


# ---------------------------------------------------------------- activations (estimates)

def layer_token_bytes(config) -> int:
    """Bytes one transformer layer keeps per token for backward (bf16, SDPA, no checkpointing):
    2 B x (4h: each block's norm input and normed input; 2q + 2kv: the q, k, v and output that
    SDPA keeps instead of a score matrix; m*i: the MLP's intermediates, fc1 output and activation
    for GELU (m = 2), gate, up, activation and product for a gated MLP (m = 4))."""
    h = config.hidden_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or h // heads
    q, kv = heads * head_dim, (getattr(config, "num_key_value_heads", None) or heads) * head_dim
    i = getattr(config, "intermediate_size", None) or int(config.mlp_ratio * h)
    gated = config.model_type in ("llama", "gemma3_text", "gemma3", "gemma", "gemma2", "mistral", "qwen2")
    return BF16 * (4 * h + 2 * q + 2 * kv + (4 if gated else 2) * i)


def tower_activations(config, tokens: int, batch: int) -> int:
    return layer_token_bytes(config) * config.num_hidden_layers * tokens * batch


def lora_dropout_activations(module, tokens: int, batch: int, dropout: float) -> int:
    """LoRA's dropout makes a copy of each adapted layer's input, kept for lora_A's backward."""
    if not dropout:
        return 0
    width = sum(m.in_features for m in module.modules() if hasattr(m, "lora_A") and hasattr(m, "in_features"))
    return BF16 * width * tokens * batch


_MERLIN_PROBES: dict[tuple, int] = {}


def merlin_activations(backbone, batch: int, volume_size) -> int:
    """A shape-only forward of the 3D ResNet on the meta device, summing every layer's output:
    the stem and each stage's output stay for backward, and the largest stage is held again
    while it is recomputed (its blocks are checkpointed)."""
    c = backbone.config
    key = (tuple(c.layers), c.width, batch, tuple(volume_size), backbone.checkpointing)
    if key not in _MERLIN_PROBES:
        _MERLIN_PROBES[key] = _merlin_probe(backbone, batch, volume_size)
    return _MERLIN_PROBES[key]


def _merlin_probe(backbone, batch, volume_size) -> int:
    import torch
    per: dict[str, int] = {}  # stem module or stage -> elements its layers output

    def count(key):
        def hook(module, inputs, output):
            per[key] = per.get(key, 0) + output.numel()
        return hook

    hooks = [m.register_forward_hook(count(name.split(".")[0]))
             for name, m in backbone.named_modules() if name and not list(m.children())]
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.no_grad():
            x = torch.empty(batch, 1, *volume_size, device="meta")
            stage_out = []
            y = backbone.maxpool(backbone.relu(backbone.bn1(backbone.conv1(x.expand(-1, 3, -1, -1, -1)))))
            for i in range(1, 5):
                y = getattr(backbone, f"layer{i}")(y)
                stage_out.append(y.numel())
    finally:
        for h in hooks:
            h.remove()
        backbone.train(was_training)
    stem = sum(v for k, v in per.items() if not k.startswith("layer"))
    stages = [per.get(f"layer{i}", 0) for i in range(1, 5)]
    if not backbone.checkpointing:
        return BF16 * (stem + sum(stages))
    return BF16 * (stem + sum(stage_out) + max(stages))


# ---------------------------------------------------------------- rows

@dataclass
class Row:
    name: str
    launcher: str
    group: str                    # rows of one group are alternative configs of one run
    model: object                 # nn.Module on meta; requires_grad marks what trains
    sources: list[str]
    batch_size: int
    mixed_precision: str
    activations: dict[str, int]   # what keeps them -> bytes (estimates)
    export_bytes: int
    notes: list[str] = field(default_factory=list)
    default: bool = True          # the launcher's own default (False: an alternative config)


def _storage_bytes(dtype: str) -> int:
    return {"float32": FP32, "bfloat16": BF16, "float16": BF16}[dtype]


def _params(module):
    """Unique parameters (a tied weight once)."""
    seen, out = set(), []
    for p in module.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def _numel(module, trained=None) -> int:
    return sum(p.numel() for p in _params(module) if trained is None or p.requires_grad == trained)


def _export(parts) -> int:
    """parts: (module, storage bytes per parameter); adapters are merged, so not counted."""
    total, seen = 0, set()
    for module, nbytes in parts:
        for n, p in module.named_parameters():
            if id(p) not in seen and "lora_" not in n:
                seen.add(id(p))
                total += p.numel() * nbytes
    return total


def _dtype_of(name):
    from scripts.demo.model_configs import config_for
    return _storage_bytes(config_for(name)[1]["torch_dtype"])


def _siglip_pair(name):
    from Stage0.towers import _wrap_siglip
    return _wrap_siglip(build_hf(name))


def _freeze(model, *, text=True, image=False, logit=True, image_backbone=False):
    """Stage0's trainer: text backbone frozen unless --no_freeze_text_encoder, a new text head
    always trains, the image tower trains, logit scale/bias by flag; --freeze_image_backbone
    leaves the image head training."""
    model.text.backbone.requires_grad_(not text)
    model.text.head.requires_grad_(True)
    model.image.requires_grad_(not image)
    if image_backbone:
        model.image.backbone.requires_grad_(False)
    model.logit_scale.requires_grad_(not logit)
    model.logit_bias.requires_grad_(not logit)


def _freeze_unreached(model, prefixes) -> int:
    """Parameters no contrastive forward reaches never get a gradient (the trainer freezes them
    under DDP; on one GPU they get no AdamW state either): counted as frozen."""
    n = 0
    for name, p in model.named_parameters():
        if p.requires_grad and name.startswith(prefixes):
            p.requires_grad_(False)
            n += p.numel()
    return n


def _text_trains(v) -> bool:
    return "--no_freeze_text_encoder" in v.get("FREEZE_FLAGS", "").split()


def stage0_row(name, model_name, v, notes=(), default=True) -> Row:
    model = _siglip_pair(model_name)
    text_trains = _text_trains(v)
    _freeze(model, text=not text_trains, logit="--no_freeze_logit_scale" not in v.get("FREEZE_FLAGS", "").split())
    b = int(v["BATCH_SIZE"])
    vcfg, tcfg = model.image.backbone.config, model.text.backbone.config
    act = {"vision tower": tower_activations(vcfg, num_patches(vcfg), b)}
    if text_trains:  # SigLIP pads every caption to its full text length
        act["text tower"] = tower_activations(tcfg, tcfg.max_position_embeddings, b)
    what = "text tower trains" if text_trains else "text tower frozen, caption features cached"
    return Row(name, LAUNCHERS["stage0"], "stage0", model, [model_name], b, v["MIXED_PRECISION"], act,
               _export([(model, _dtype_of(model_name))]), [what, *notes], default)


def stage1_row(v) -> Row:
    vlm = build_vlm(v["VISION_MODEL_NAME"], v["LLM_NAME"])
    vlm.requires_grad_(False)
    vlm.model.multi_modal_projector.requires_grad_(True)
    b, cap = int(v["BATCH_SIZE"]), int(v["MAX_CAPTION_LEN"])
    n_img = vlm.config.image_seq_length
    text = vlm.config.text_config
    proj = vlm.model.multi_modal_projector
    act = {"LM (frozen, the projector's gradient flows through it)": tower_activations(text, 1 + n_img + cap, b),
           "LM loss": LM_LOSS_BYTES_PER_LOGIT * text.vocab_size * cap * b,
           "projector": BF16 * (proj.linear_1.in_features + 2 * proj.linear_1.out_features) * n_img * b}
    return Row("Stage1 projector", LAUNCHERS["stage1"], "stage1", vlm, [v["VISION_MODEL_NAME"], v["LLM_NAME"]], b,
               v["MIXED_PRECISION"], act, _export([(vlm, _dtype_of(v["LLM_NAME"]))]),  # saved in the LM's dtype
               [f"{n_img} image tokens + {cap} caption tokens; vision tower and LM frozen"])


def stage2_row(v, stage1_vars, label: str = "", group: str = "stage2", default: bool = True) -> Row:
    vision_name = v.get("VISION_MODEL_NAME") or stage1_vars["VISION_MODEL_NAME"]
    vlm = build_vlm(vision_name, v["LLM_NAME"])
    flags = v.get("EXTRA_FLAGS", "").split()
    lora_r = int(v.get("LORA_R", "0"))
    train_proj, train_vision = "--unfreeze_projection_layer" in flags, "--train_ve_first_epoch" in flags
    vlm.requires_grad_(False)
    for part in (vlm.model.language_model, vlm.lm_head):
        part.requires_grad_(not lora_r)
    vlm.model.multi_modal_projector.requires_grad_(train_proj)
    vlm.model.vision_tower.requires_grad_(train_vision)
    b, q, a = int(v["BATCH_SIZE"]), int(v["MAX_Q_LEN"]), int(v["MAX_A_LEN"])
    n_img = vlm.config.image_seq_length
    text, seq = vlm.config.text_config, n_img + q + a + GEMMA_TURN_TOKENS
    act = {"LM": tower_activations(text, seq, b), "LM loss": LM_LOSS_BYTES_PER_LOGIT * text.vocab_size * a * b}
    what = "LM fully"
    if lora_r:
        from Stage2.train_vqa_stage2 import DEFAULT_LORA_TARGETS
        _lora(vlm.model.language_model, r=lora_r, alpha=float(v.get("LORA_ALPHA", 16)), dropout=0.05,
              targets=DEFAULT_LORA_TARGETS.split(","))
        act["LoRA dropout"] = lora_dropout_activations(vlm.model.language_model, seq, b, 0.05)
        what = f"LoRA r={lora_r} on the LM"
    if train_vision:
        act["vision tower"] = tower_activations(vlm.config.vision_config, n_img, b)
    export = _export([(vlm.model.vision_tower, _dtype_of(vision_name)), (vlm.model.multi_modal_projector, FP32),
                      (vlm.model.language_model, _dtype_of(v["LLM_NAME"]))])
    extra = " + projector" if train_proj else ""
    return Row(f"Stage2 {what.replace(' fully', ' full')}{extra}{label}", LAUNCHERS["stage2"], group, vlm,
               [vision_name, v["LLM_NAME"]], b, v["MIXED_PRECISION"], act, export,
               [f"trains the {what}{extra} (projector frozen unless --unfreeze_projection_layer); "
                f"{n_img} image + {q} question + {a} answer tokens"], default)


def base_vlm_defaults(path) -> dict[str, str]:
    """The launcher's defaults with BASE_VLM set: the `if [[ -n "$BASE_VLM" ]]` block's values
    first (they are set before the general block, whose `:=` then keeps them)."""
    lines = Path(path).read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith('if [[ -n "$BASE_VLM" ]]'))
    block = {}
    for line in lines[start + 1:]:
        if line.strip() == "fi":
            break
        m = _VAR.match(line.strip())
        if m and "$" not in m.group(2):
            block[m.group(1)] = m.group(2)
    return {**launcher_defaults(path), **block}


def base_vlm_row(v, name: str, label: str, default: bool) -> Row:
    """Stage2 --base_vlm as the launcher runs it with BASE_VLM (LoRA on every linear layer of
    the LM, gradient checkpointing) or LORA_R=0 (the LM fully), bf16, the launcher's batch."""
    model = build_base_vlm(name)
    lora_r = int(v.get("LORA_R", "0"))
    checkpointing = v.get("GRADIENT_CHECKPOINTING") == "1"
    model.requires_grad_(False)
    for part in (model.model.language_model, model.lm_head):
        part.requires_grad_(not lora_r)
    b, q, a = int(v["BATCH_SIZE"]), int(v["MAX_Q_LEN"]), int(v["MAX_A_LEN"])
    text = model.config.text_config
    # The template's turn markers, <start_of_image>/<end_of_image> and the blank lines around them.
    seq = model.config.mm_tokens_per_image + q + a + GEMMA_TURN_TOKENS + 4
    if checkpointing:  # each block's input kept, one block's activations at a time (recomputed)
        lm_act = BF16 * text.hidden_size * text.num_hidden_layers * seq * b + layer_token_bytes(text) * seq * b
    else:
        lm_act = tower_activations(text, seq, b)
    act = {"LM" + (" (gradient checkpointing)" if checkpointing else ""): lm_act,
           "LM loss": LM_LOSS_BYTES_PER_LOGIT * text.vocab_size * a * b}
    what = "LM full"
    if lora_r:
        targets = sorted({n.rsplit(".", 1)[-1] for n, m in model.model.language_model.named_modules()
                          if type(m).__name__ == "Linear"})
        _lora(model.model.language_model, r=lora_r, alpha=float(v.get("LORA_ALPHA", 16)), dropout=0.05,
              targets=targets)
        if not checkpointing:
            act["LoRA dropout"] = lora_dropout_activations(model.model.language_model, seq, b, 0.05)
        what = f"LoRA r={lora_r} all-linear"
    return Row(f"Stage2 --base_vlm {what} ({label})", LAUNCHERS["stage2"], f"stage2 {label}", model, [name], b,
               v["MIXED_PRECISION"], act, _export([(model, BF16)]),
               [f"BASE_VLM={name}" + ("" if lora_r else " LORA_R=0") + f"; {model.config.mm_tokens_per_image} image + "
                f"{q} question + {a} answer tokens" + ("; gradient checkpointing" if checkpointing else "")], default)


BASE_VLMS = {"MedGemma 4B": "google/medgemma-4b-it", "MedGemma 27B": "google/medgemma-27b-it"}


def base_vlm_rows(root=ROOT) -> list[Row]:
    v = base_vlm_defaults(Path(root) / LAUNCHERS["stage2"])
    full = {**v, "LORA_R": "0", "GRADIENT_CHECKPOINTING": "0"}
    return [row for label, name in BASE_VLMS.items()
            for row in (base_vlm_row(v, name, label, False), base_vlm_row(full, name, label, False))]


def knee_row(v) -> Row:
    import torch
    from torch import nn

    from Stage0.towers import ContrastiveModel, ImageTower, TextTower
    image_bb = build_hf(v["IMAGE_MODEL_NAME"])
    text_bb = build_hf(v["TEXT_MODEL_NAME"], "text")
    shared = TextTower(text_bb, "siglip").feature_dim
    with _meta():
        image = ImageTower(image_bb, "hf", v.get("IMAGE_POOLING", "cls"), out_dim=shared)
        text = TextTower(text_bb, "siglip", out_dim=shared)
    scalar = lambda: nn.Parameter(torch.empty((), device="meta"))  # noqa: E731
    model = ContrastiveModel(image, text, scalar(), scalar())
    text_trains = _text_trains(v)
    _freeze(model, text=not text_trains, logit=False)
    _freeze_unreached(model, ("image.backbone.embeddings.mask_token",))
    b, size = int(v["BATCH_SIZE"]), int(v["IMAGE_SIZE"])
    cfg, tcfg = image_bb.config, text_bb.config
    act = {"image tower (CLS + patches)": tower_activations(cfg, num_patches(cfg, size) + 1, b)}
    if text_trains:
        act["text tower"] = tower_activations(tcfg, tcfg.max_position_embeddings, b)
    what = "SigLIP text tower trains" if text_trains else "SigLIP text tower frozen, caption features cached"
    return Row(f"knee RAD-DINO @{size}", LAUNCHERS["knee"], "knee", model,
               [v["IMAGE_MODEL_NAME"], v["TEXT_MODEL_NAME"]], b, v["MIXED_PRECISION"], act,
               _export([(image_bb, _dtype_of(v["IMAGE_MODEL_NAME"])), (text_bb, _dtype_of(v["TEXT_MODEL_NAME"])),
                        (model, FP32)]),
               [f"image tower + heads + logit scale/bias train; {what}"])


def ct_row(v, phase: int, lora: dict | None = None, default: bool = True) -> Row:
    import torch
    from torch import nn

    from scripts.demo.model_configs import config_for
    from Stage0.merlin import MerlinBackbone
    from Stage0.towers import ContrastiveModel, ImageTower, TextTower
    text_id, _ = config_for(v["TEXT_MODEL_PATH"])
    merlin_cfg = config_for("merlin")[1]
    with torch.device("meta"):
        merlin = MerlinBackbone(layers=merlin_cfg["layers"], width=merlin_cfg["width"],
                                num_classes=merlin_cfg["num_classes"])
    llm = build_hf(v["TEXT_MODEL_PATH"])
    dim = int(v["PROJECTION_DIM"])
    with _meta():
        image = ImageTower(merlin, "merlin", out_dim=dim)
        text = TextTower(llm, "llm2vec", out_dim=dim)
    scalar = lambda: nn.Parameter(torch.empty((), device="meta"))  # noqa: E731
    model = ContrastiveModel(image, text, scalar(), scalar())
    b = int(v["BATCH_SIZE"])
    volume = [int(x) for x in v["VOLUME_SIZE"].split()]
    tokens = int(v["MAX_TEXT_LENGTH"])
    if phase == 1:
        _freeze(model, text=True, logit=False, image_backbone=True)
        act = {"heads": 0}
        name, what = "CT phase 1", "heads + logit scale/bias train on a frozen Merlin and a frozen 8B text tower"
    else:
        _freeze(model, text=False, logit=False)
        act = {"Merlin (checkpointed stages)": merlin_activations(merlin, b, volume),
               "text tower": tower_activations(llm.config, tokens, b)}
        name, what = "CT phase 2, full", "everything trains, the 8B text tower fully (TEXT_LORA_R=0)"
        if lora:
            from Stage0 import towers
            if hasattr(towers, "apply_text_lora"):  # the trainer's own injection, when it has one
                with _meta():
                    towers.apply_text_lora(model, text_id, r=lora["r"], alpha=lora["alpha"], dropout=lora["dropout"],
                                           target_modules=",".join(lora["targets"]))
            else:
                _lora(llm, r=lora["r"], alpha=lora["alpha"], dropout=lora["dropout"], targets=lora["targets"])
            act["LoRA dropout"] = lora_dropout_activations(llm, tokens, b, lora["dropout"])
            name = f"CT phase 2, LoRA r={lora['r']}"
            what = f"Merlin + heads train, LoRA r={lora['r']} on every linear layer of the 8B text tower"
    unreached = _freeze_unreached(model, ("image.backbone.classifier.", "image.backbone.contrastive_head."))
    export = _export([(llm, _dtype_of(text_id)), (merlin, FP32), (model, FP32)])
    notes = [what]
    if unreached:
        notes.append(f"Merlin's own classifier and contrastive head ({unreached / 1e6:.1f}M) are never reached: "
                     "counted as frozen")
    return Row(name, LAUNCHERS["ct"], f"ct-phase{phase}", model, ["merlin", text_id], b, v["MIXED_PRECISION"],
               act, export, notes, default)


def derm_row(v) -> Row:
    from Stage0.towers import apply_lora
    model = _siglip_pair(v["MODEL_NAME"])
    with _meta():
        apply_lora(model, v["MODEL_NAME"], r=int(v["LORA_R"]), alpha=float(v["LORA_ALPHA"]),
                   dropout=float(v["LORA_DROPOUT"]))
    model.logit_scale.requires_grad_(True)  # --no_freeze_logit_scale in the launcher
    model.logit_bias.requires_grad_(True)
    b, dropout = int(v["BATCH_SIZE"]), float(v["LORA_DROPOUT"])
    s = model.siglip
    vcfg, tcfg = s.config.vision_config, s.config.text_config
    n_img, n_txt = num_patches(vcfg), tcfg.max_position_embeddings
    act = {"vision tower": tower_activations(vcfg, n_img, b), "text tower": tower_activations(tcfg, n_txt, b),
           "LoRA dropout": lora_dropout_activations(s.vision_model, n_img, b, dropout)
           + lora_dropout_activations(s.text_model, n_txt, b, dropout)}
    return Row(f"derm LoRA r={v['LORA_R']}", LAUNCHERS["derm"], "derm", model, [v["MODEL_NAME"]], b,
               v["MIXED_PRECISION"], act, _export([(s, _dtype_of(v["MODEL_NAME"]))]),
               ["LoRA on both towers (texts embedded every step) + logit scale/bias; export: the merged SiglipModel",
                "the label-aware losses' class-text embeddings are not counted"])


LARGER_LMS = {"Gemma 3 4B": "google/gemma-3-4b-it", "Gemma 3 12B": "google/gemma-3-12b-it",
              "Gemma 3 27B": "google/gemma-3-27b-it"}  # MedGemma 4B and 27B: the 4B and 27B shapes


def larger_lm_rows(v, stage1_vars) -> list[Row]:
    """Stage2 with a larger Gemma 3 as LLM_NAME, in full and through LoRA r=16, one sample per
    GPU (GRAD_ACCUM makes up the global batch): which engine and how many GPUs each needs."""
    return [stage2_row({**v, "LLM_NAME": lm, "LORA_R": str(r), "BATCH_SIZE": "1"}, stage1_vars, f" ({name})",
                       f"stage2 {name}", False)
            for name, lm in LARGER_LMS.items() for r in (0, 16)]


def build_rows(root=ROOT) -> list[Row]:
    s0 = _launcher("stage0", root)
    s1 = _launcher("stage1", root)
    ct = _launcher("ct", root)
    # With a text LoRA rank in the CT launcher (TEXT_LORA_R), LoRA is phase 2's default and the
    # full fine-tune the alternative; TEXT_LORA_R=0 swaps them.
    ct_lora_r = int(ct.get("TEXT_LORA_R", "0"))
    r = ct_lora_r or CT_LORA["r"]
    ct_lora = {**CT_LORA, "r": r, "alpha": float(ct.get("TEXT_LORA_ALPHA", 2 * r)),
               "dropout": float(ct.get("TEXT_LORA_DROPOUT", CT_LORA["dropout"]))}
    ct2 = [ct_row(ct, 2, lora=ct_lora, default=bool(ct_lora_r)), ct_row(ct, 2, default=not ct_lora_r)]
    return [
        stage0_row("Stage0 L/16-384", s0["MODEL_NAME"], s0),
        stage0_row("Stage0 So400m/14-384", "google/siglip-so400m-patch14-384", s0,
                   ["MODEL_NAME=google/siglip-so400m-patch14-384"], default=False),
        stage1_row(s1),
        stage2_row(_launcher("stage2", root), s1),
        *larger_lm_rows(_launcher("stage2", root), s1),
        *base_vlm_rows(root),
        knee_row(_launcher("knee", root)),
        ct_row(ct, 1),
        *sorted(ct2, key=lambda row: not row.default),
        derm_row(_launcher("derm", root)),
    ]


# ---------------------------------------------------------------- accounting

def trained_buffer_bytes(model) -> int:
    """Persistent buffers of modules whose own parameters train (BatchNorm running statistics
    change with them and resume with them)."""
    total = 0
    for module in model.modules():
        if any(p.requires_grad for p in module.parameters(recurse=False)):
            for name, buf in module.named_buffers(recurse=False):
                if buf is not None and name not in module._non_persistent_buffers_set:
                    total += buf.numel() * buf.element_size()
    return total


def shard_units(model) -> tuple[int, int]:
    """(parameters of the largest block, parameters no block holds) for FSDP's per-block
    wrapping; blocks are the outermost modules named in any submodel's `_no_split_modules`."""
    names = set()
    for m in model.modules():
        names.update(getattr(m, "_no_split_modules", None) or [])
    blocks = []

    def walk(module):
        if type(module).__name__ in names:
            blocks.append(module)
            return
        for child in module.children():
            walk(child)
    walk(model)
    in_blocks = {id(p) for b in blocks for p in b.parameters()}
    root = sum(p.numel() for p in model.parameters() if id(p) not in in_blocks)  # a tied tensor once
    return max((sum(p.numel() for p in b.parameters()) for b in blocks), default=0), root


def _engines(trained, weights, grads, adam, autocast, act, gathered, n) -> dict:
    return {
        "one_gpu": {"gpus": 1, "weights": weights, "gradients": grads, "optimizer": adam,
                    "autocast_copies": autocast, "activations": act},
        "ddp": {"gpus": n, "weights": weights, "gradients": grads + DDP_BUCKET_BYTES * trained,
                "optimizer": adam, "autocast_copies": autocast, "activations": act},
        "zero2": {"gpus": n, "weights": weights, "gradients": grads / n,
                  "optimizer": adam / n, "autocast_copies": 0, "activations": act},
        "fsdp2": {"gpus": n, "weights": weights / n + (gathered if n > 1 else 0), "gradients": grads / n,
                  "optimizer": adam / n, "autocast_copies": 0, "activations": act},
    }


def account(row: Row, num_gpus: int, gpu_bytes: float) -> dict:
    total, trained = _numel(row.model), _numel(row.model, trained=True)
    frozen = total - trained
    bf16 = row.mixed_precision == "bf16"
    weights = FP32 * trained + (BF16 if bf16 else FP32) * frozen
    grads, adam = GRAD_BYTES * trained, ADAM_BYTES * trained
    autocast = AUTOCAST_COPY_BYTES * trained if row.mixed_precision in ("bf16", "fp16") else 0
    act = sum(row.activations.values())
    block, root = shard_units(row.model)
    gathered = (BF16 if row.mixed_precision in ("bf16", "fp16") else FP32) * (2 * block + root)

    def totals(n):
        out = _engines(trained, weights, grads, adam, autocast, act, gathered, n)
        for e in out.values():
            e["total"] = sum(v for k, v in e.items() if k != "gpus")
            e["fits"] = e["total"] <= gpu_bytes
        return out
    engines = totals(num_gpus)
    # The fewest GPUs (of GPU_COUNTS) with which each sharded engine fits, or None.
    gpus_needed = {k: next((n for n in GPU_COUNTS if totals(n)[k]["fits"]), None) for k in SHARDED}
    buffers = trained_buffer_bytes(row.model)
    return {
        "name": row.name, "launcher": row.launcher, "group": row.group, "launcher_default": row.default,
        "sources": row.sources, "batch_size": row.batch_size, "mixed_precision": row.mixed_precision,
        "params_total": total, "params_trained": trained, "params_frozen": frozen,
        "engines": engines, "gpus_needed": gpus_needed, "activations_detail": row.activations,
        "resume_checkpoint_bytes": FP32 * trained + ADAM_BYTES * trained + buffers + SMALL_STATE_BYTES,
        "resume_detail": {"trained_tensors": FP32 * trained, "optimizer_state": ADAM_BYTES * trained,
                          "trained_buffers": buffers, "small_state": SMALL_STATE_BYTES},
        "export_bytes": row.export_bytes, "notes": row.notes,
    }


ENGINE_NAMES = {"one_gpu": "one GPU", "ddp": "DDP x{n}", "zero2": "ZeRO-2 x{n}", "fsdp2": "FSDP2 x{n}"}


def verdicts(rows: list[dict], num_gpus: int) -> None:
    """Each row: does it fit one GPU (the launchers' NUM_GPUS=1), and if not, which engine or
    which alternative row of the same run does."""
    for r in rows:
        r["fits_one_gpu"] = r["engines"]["one_gpu"]["fits"]
        fits_with = [ENGINE_NAMES[e].format(n=num_gpus) for e in WORKING_ENGINES if r["engines"][e]["fits"]]
        alternatives = [o["name"] for o in rows if o is not r and o["group"] == r["group"]
                        and o["engines"]["one_gpu"]["fits"]]
        r["fits_with"] = fits_with + [f"{a} (one GPU)" for a in alternatives if not r["fits_one_gpu"]]


def audit(num_gpus=8, gpu_gb=80.0, headroom=0.10, root=ROOT) -> dict:
    import logging

    import transformers
    level = transformers.logging.get_verbosity()
    ours = logging.getLogger("siglip_med")
    our_level = ours.level
    transformers.logging.set_verbosity_error()  # config validation chatter about token ids
    ours.setLevel(logging.WARNING)
    try:
        rows = build_rows(root)
    finally:
        transformers.logging.set_verbosity(level)
        ours.setLevel(our_level)
    gpu_bytes = gpu_gb * GIB * (1 - headroom)
    out = [account(r, num_gpus, gpu_bytes) for r in rows]
    verdicts(out, num_gpus)
    return {"gpu_gb": gpu_gb, "headroom": headroom, "usable_bytes": gpu_bytes, "num_gpus": num_gpus,
            "small_state_bytes": SMALL_STATE_BYTES, "rows": out}


# ---------------------------------------------------------------- output

def _params_str(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e5 else f"{n:,}"


def _gib(n: float) -> str:
    return f"{n / GIB:.1f}"


def _size(n: float) -> str:
    return f"{n / GIB:.1f} GiB" if n >= GIB / 10 else f"{n / 2 ** 20:.0f} MiB"


def markdown(result: dict) -> str:
    n, gb = result["num_gpus"], result["gpu_gb"]
    head = (f"| run | params | trained | batch/GPU | weights | grads | AdamW | activations (est.) | one GPU | "
            f"DDP x{n} | ZeRO-2 x{n} | FSDP2 x{n} | GPUs: ZeRO-2 / FSDP2 | resume ckpt | export | fits {gb:g} GB |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in result["rows"]:
        e = r["engines"]
        one = e["one_gpu"]
        if r["fits_one_gpu"]:
            verdict = "yes"
        elif r["fits_with"]:
            verdict = "no: " + "; ".join(r["fits_with"])
        else:
            verdict = "no"
        lines.append("| " + " | ".join([
            r["name"] + ("" if r["launcher_default"] else " *"), _params_str(r["params_total"]),
            _params_str(r["params_trained"]), str(r["batch_size"]), _gib(one["weights"]), _gib(one["gradients"]),
            _gib(one["optimizer"]), _gib(one["activations"]),
            *(_gib(e[k]["total"]) for k in ENGINES),
            " / ".join(str(r["gpus_needed"][k] or "-") for k in SHARDED),
            _size(r["resume_checkpoint_bytes"]), _size(r["export_bytes"]),
            verdict]) + " |")
    note = (f"GiB per GPU, bf16 mixed precision, AdamW. weights/grads/AdamW/activations: one GPU; the engine "
            f"columns are totals (autocast's bf16 copies of trained weights under one GPU and DDP, DDP's gradient "
            f"buckets; ZeRO-2 shards gradients and AdamW state over {n} GPUs, not weights; FSDP2 shards all "
            f"three and gathers the root unit and two blocks). GPUs: the fewest "
            f"of {', '.join(map(str, GPU_COUNTS))} with which that engine fits ('-': none). Activations are a "
            f"rough estimate (python scripts/bench/size_audit.py --help). Fits: within {1 - result['headroom']:.0%} of "
            f"{gb:g} GiB. * an alternative to the launcher's default.")
    lines += ["", textwrap.fill(note, width=100)]
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    result = audit(num_gpus=args.num_gpus, gpu_gb=args.gpu_gb, headroom=args.headroom)
    print(markdown(result))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
