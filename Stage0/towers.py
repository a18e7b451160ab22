"""Towers for Stage0's contrastive training: inputs in, one embedding per sample out.

A tower is a backbone, a pooling and (where its width differs from the shared one) a linear
projection head, plus its own preprocessing. The trainer, the loss, the metrics and the
inference CLI only see embeddings, so a new kind of tower (a 3D CT encoder, a decoder LLM used
as a text encoder) is one new class here, not a change to the loop.

- `--model_name` alone: one pretrained SigLIP, both towers, its own logit scale and bias
  (seed 000). Saved as a plain `SiglipModel` folder, exactly as before.
- `--image_model_name` / `--text_model_name`: any Hugging Face image backbone (DINOv2,
  RAD-DINO, a SigLIP's vision half) against a SigLIP text tower or a BERT-style encoder, with
  new projection heads and a learnable logit scale and bias (seed 003). Saved as a towers
  folder: `towers.json`, `image_tower/` and `text_tower/` in Hugging Face format, and
  `heads.safetensors` (projections, logit scale, bias).

The text side is split into a backbone (cacheable when frozen) and a head (trained even when
the backbone is frozen): a frozen text tower's captions are embedded once, and a new head on
top of them still learns.
"""
from __future__ import annotations

import json
import logging
import math
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoTokenizer, SiglipModel, SiglipTextModel

from Stage0.merlin import MerlinBackbone, VolumeProcessor, load_merlin_weights
from training.exports import add_lora_deltas
from vision_tower import load_vision_tower

logger = logging.getLogger("siglip_med")

TOWERS_FILE, HEADS_FILE = "towers.json", "heads.safetensors"
IMAGE_DIR, TEXT_DIR = "image_tower", "text_tower"
VISION_ENCODER_FILE = "vision_encoder.bin"  # seed 000's file: the image backbone's state dict
PAPER_LOGIT_SCALE, PAPER_LOGIT_BIAS = math.log(10.0), -10.0  # SigLIP paper init: t = 10, b = -10


def _is_siglip(config) -> bool:
    return config.model_type in ("siglip", "siglip_vision_model", "siglip_text_model")


class ImageTower(nn.Module):
    """pixel_values -> [B, dim]. SigLIP vision: its attention-pooled output. Other backbones:
    the CLS token or the mean of the patch tokens (`pooling`)."""

    def __init__(self, backbone, kind: str, pooling: str = "cls", out_dim: int | None = None):
        super().__init__()
        self.backbone, self.kind, self.pooling = backbone, kind, pooling
        width = backbone.config.hidden_size
        if kind == "merlin" and out_dim:  # the CT seed's head: 2048 -> 1024 -> 512
            self.head = nn.Sequential(nn.Linear(width, width // 2), nn.GELU(), nn.Linear(width // 2, out_dim))
        else:
            self.head = nn.Linear(width, out_dim) if out_dim else nn.Identity()
        self.out_dim = out_dim or width

    def forward(self, pixel_values):
        if self.kind == "merlin":
            return self.head(self.backbone(pixel_values))
        out = self.backbone(pixel_values=pixel_values)
        if self.kind == "siglip":
            feats = out.pooler_output
        elif self.pooling == "mean":
            # DINOv2 / RAD-DINO: token 0 is CLS; register tokens, if any, are not patches either.
            n_reg = getattr(self.backbone.config, "num_register_tokens", 0) or 0
            feats = out.last_hidden_state[:, 1 + n_reg:].mean(dim=1)
        else:
            feats = out.last_hidden_state[:, 0]
        return self.head(feats)


LLM2VEC_SEPARATOR = "!@#$%^&*()"  # LLM2Vec's instruction/text separator


class TextTower(nn.Module):
    """(input_ids, attention_mask) -> [B, dim], as backbone features then a head.
    SigLIP text: its pooled last position, max-length padding, no mask unless asked (as it was
    trained). BERT-style: the mean over real tokens. LLM2Vec-style (a decoder LLM): attention
    made bidirectional, left padding, the mean over the text's own tokens only: an instruction
    before LLM2Vec's separator (`instruction!@#$%^&*()text`) is attended to but not pooled;
    the attention mask carries 1 for such tokens and 2 for pooled ones."""

    def __init__(self, backbone, kind: str, out_dim: int | None = None, use_mask: bool = False):
        super().__init__()
        self.backbone, self.kind = backbone, kind
        self.use_mask = use_mask or kind != "siglip"
        width = self.feature_dim
        self.head = nn.Linear(width, out_dim) if out_dim and out_dim != width else nn.Identity()
        self.out_dim = out_dim or width

    @property
    def feature_dim(self) -> int:
        c = self.backbone.config
        return getattr(c, "projection_size", None) or c.hidden_size if self.kind == "siglip" else c.hidden_size

    def features(self, input_ids, attention_mask=None):
        if self.kind == "llm2vec":
            out = self.backbone(input_ids=input_ids, attention_mask=(attention_mask > 0).long())
            pool = attention_mask == 2
        else:
            mask = attention_mask if self.use_mask else None
            out = self.backbone(input_ids=input_ids, attention_mask=mask)
            if self.kind == "siglip":
                return out.pooler_output
            pool = attention_mask > 0
        m = pool.unsqueeze(-1).to(out.last_hidden_state.dtype)
        return (out.last_hidden_state * m).sum(1) / m.sum(1).clamp(min=1)

    def tokenize(self, tokenizer, texts, max_length: int):
        """(input_ids, attention_mask) for this tower, padded to max_length."""
        if self.kind != "llm2vec":
            tok = tokenizer(list(texts), padding="max_length", truncation=True, max_length=max_length,
                            return_tensors="pt")
            return tok["input_ids"], tok.get("attention_mask", torch.ones_like(tok["input_ids"]))
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        ids = torch.full((len(texts), max_length), pad, dtype=torch.long)
        mask = torch.zeros((len(texts), max_length), dtype=torch.long)
        for i, t in enumerate(texts):
            instruction, _, text = str(t).rpartition(LLM2VEC_SEPARATOR)
            head = bos + (tokenizer(instruction.strip(), add_special_tokens=False)["input_ids"] if instruction else [])
            body = tokenizer(text.strip(), add_special_tokens=False)["input_ids"][: max(max_length - len(head), 1)]
            seq, codes = (head + body)[-max_length:], ([1] * len(head) + [2] * len(body))[-max_length:]
            ids[i, max_length - len(seq):] = torch.tensor(seq)  # left padding, as LLM2Vec
            mask[i, max_length - len(seq):] = torch.tensor(codes)
        return ids, mask

    def forward(self, input_ids, attention_mask=None):
        return self.head(self.features(input_ids, attention_mask))


class ContrastiveModel(nn.Module):
    """An image tower, a text tower and the SigLIP loss's learnable logit scale t' and bias b."""

    def __init__(self, image: ImageTower, text: TextTower, logit_scale: nn.Parameter, logit_bias: nn.Parameter,
                 siglip: SiglipModel | None = None, spec: dict | None = None):
        super().__init__()
        self.image, self.text = image, text
        self.logit_scale, self.logit_bias = logit_scale, logit_bias
        # One pretrained SigLIP (both towers, no new heads): saved as that SiglipModel.
        self._siglip = [siglip]  # a list, so the module is not registered twice
        self.spec = spec or {}
        self.lora = None  # {"config": LoraConfig, "source": checkpoint} once apply_lora ran
        self.text_lora = None  # {"config": LoraConfig, "source": checkpoint} once apply_text_lora ran

    @property
    def siglip(self):
        return self._siglip[0]

    @property
    def vision_model(self):  # the trainer's names for what trains
        return self.image

    @property
    def text_model(self):
        return self.text

    def save_pretrained(self, out_dir, tokenizer=None, image_processor=None, skip=()) -> None:
        """`skip`: parts (IMAGE_DIR, TEXT_DIR, VISION_ENCODER_FILE) already in place, linked
        unchanged from an earlier export of the run (training.exports.ExportCopies)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        backbone = self.image.backbone
        if VISION_ENCODER_FILE not in skip:
            torch.save({k: v.detach().cpu() for k, v in backbone.state_dict().items()}, out / VISION_ENCODER_FILE)
        if self.siglip is not None:
            # Not deduplicated across exports: one model.safetensors holds both towers, so a frozen
            # text half shares its file with the trained vision half. Per-tower shards plus an index
            # would keep from_pretrained working but break every reader of model.safetensors
            # itself (safetensors.load_file, conversion scripts).
            if self.lora is not None:
                save_lora_siglip(self, out)
            else:
                self.siglip.save_pretrained(out, safe_serialization=True)
            for obj in (tokenizer, image_processor):
                if obj is not None:
                    obj.save_pretrained(out)
            return
        from safetensors.torch import save_file
        if IMAGE_DIR not in skip:
            if self.image.kind == "merlin":
                (out / IMAGE_DIR).mkdir(parents=True, exist_ok=True)
                c = backbone.config
                (out / IMAGE_DIR / "merlin_config.json").write_text(json.dumps(
                    {"layers": c.layers, "width": c.width, "num_classes": c.num_classes}, indent=2))
                save_file({k: v.detach().cpu().contiguous() for k, v in backbone.state_dict().items()},
                          str(out / IMAGE_DIR / "model.safetensors"))
            else:
                backbone.save_pretrained(out / IMAGE_DIR, safe_serialization=True)
            if image_processor is not None:
                image_processor.save_pretrained(out / IMAGE_DIR)
        if TEXT_DIR not in skip:
            if self.text_lora is not None:
                save_lora_text(self, out / TEXT_DIR)
            else:
                self.text.backbone.save_pretrained(out / TEXT_DIR, safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(out / TEXT_DIR)
        heads = {f"image.{k}": v for k, v in self.image.head.state_dict().items()}
        heads.update({f"text.{k}": v for k, v in self.text.head.state_dict().items()})
        heads.update(logit_scale=self.logit_scale.detach().reshape(1), logit_bias=self.logit_bias.detach().reshape(1))
        save_file({k: v.detach().cpu().contiguous() for k, v in heads.items()}, str(out / HEADS_FILE))
        spec = {**self.spec, "format": "siglip-med-towers/1", "image_dim": self.image.out_dim,
                "text_dim": self.text.out_dim}
        (out / TOWERS_FILE).write_text(json.dumps(spec, indent=2))


# ---------------------------------------------------------------- building

def load_tokenizer(name, *, siglip: bool = False):
    """AutoTokenizer.from_pretrained(name), lowercasing where the model was trained on lowercased
    text and the tokenizer would not lowercase.

    SigLIP 2 was pretrained on lowercased text (transformers' SigLIP 2 notes say so). Its
    fixed-resolution checkpoints are model type `siglip` (loaded as any SigLIP) with a Gemma
    tokenizer, which has no lowercasing: transformers lowercases for model type `siglip2` alone
    (its Siglip2Tokenizer). So "Cardiomegaly" and "cardiomegaly" would be other tokens at
    fine-tuning and inference than in pretraining. `siglip=True` (a SigLIP text tower): a Gemma
    tokenizer there is SigLIP 2's and gets a Lowercase normalizer in front, as Siglip2Tokenizer
    does. Any tokenizer whose config declares do_lower_case and whose pipeline does not lowercase
    gets the same. The original SigLIP's SiglipTokenizer and uncased BERTs already lowercase
    and are left as they are. The exports record do_lower_case, so whatever reads them through
    here lowercases too."""
    tokenizer = AutoTokenizer.from_pretrained(name)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    siglip2 = siglip and type(tokenizer).__name__.startswith("Gemma")
    if backend is None or not (siglip2 or tokenizer.init_kwargs.get("do_lower_case")):
        return tokenizer
    if backend.normalizer is None or backend.normalizer.normalize_str("Lung") != "lung":
        from tokenizers import normalizers
        backend.normalizer = normalizers.Sequence([normalizers.Lowercase(), *([backend.normalizer]
                                                                             if backend.normalizer else [])])
        tokenizer.init_kwargs["do_lower_case"] = True  # saved with the exports' tokenizer files
        logger.info("%s: text is lowercased, as the model was trained (%s)", name,
                    "SigLIP 2: a SigLIP text tower with a Gemma tokenizer" if siglip2 else
                    f"tokenizer_config.json sets do_lower_case, which {type(tokenizer).__name__} ignores")
    return tokenizer


def _siglip_text(name):
    """The text half of a SigLIP checkpoint (or a text-only one) as a SiglipTextModel: its keys
    carry the same `text_model.` prefix, so only the text weights are read."""
    from vision_tower import _checked_from_pretrained
    return _checked_from_pretrained(SiglipTextModel, name)


def _auto_backbone(path):
    config = AutoConfig.from_pretrained(path)
    cls = SiglipTextModel if config.model_type == "siglip_text_model" else AutoModel
    return cls.from_pretrained(path, dtype=torch.float32)


def _image_processor(name, backbone, image_size: int | None):
    """The image tower's own preprocessing (a DINO tower never gets SigLIP-normalised pixels).
    --image_size overrides both the resize and the crop of a DINOv2-style processor (RAD-DINO's
    default resizes to 518); SigLIP towers keep their checkpoint's size."""
    try:
        proc = AutoImageProcessor.from_pretrained(name)
    except (OSError, ValueError):
        from vision_tower import load_image_processor
        proc = load_image_processor(name, backbone.config)
    if image_size:
        if _is_siglip(backbone.config):
            if image_size != backbone.config.image_size:
                warnings.warn(f"--image_size {image_size} ignored: a SigLIP tower's position table fixes "
                              f"its input at {backbone.config.image_size} px")
        else:
            if "shortest_edge" in (proc.size or {}):
                proc.size = {"shortest_edge": image_size}
            else:
                proc.size = {"height": image_size, "width": image_size}
            if getattr(proc, "crop_size", None) is not None:
                proc.crop_size = {"height": image_size, "width": image_size}
    return proc


def text_length(text: TextTower, tokenizer, requested: int | None) -> int:
    """The text tower fixes its length limit (64 for most SigLIPs, 512 for BERT): more is
    clamped with a warning (the seed's 512 on a 64-token tower); by default SigLIP uses exactly
    its length (max-length padding is part of the model), BERT-style towers 128."""
    limit = text.backbone.config.max_position_embeddings
    tok_max = getattr(tokenizer, "model_max_length", None)
    if tok_max and tok_max < limit:
        limit = tok_max
    if requested and requested > limit:
        logger.warning("--max_text_length %d exceeds the text tower's %d tokens; using %d", requested, limit, limit)
    default = limit if text.kind == "siglip" else min(128, limit)
    return min(requested or default, limit)


def build_model(args):
    """(ContrastiveModel, tokenizer, image_processor) from the flags; a towers folder or a
    SiglipModel folder given as --model_name loads as saved (a Stage0 final_model/ resumes)."""
    image_name, text_name = getattr(args, "image_model_name", None), getattr(args, "text_model_name", None)
    text_path = getattr(args, "text_model_path", None)
    if text_path and (Path(text_path) / TOWERS_FILE).is_file():
        # The CT seed's phase 2 passes its phase-1 checkpoint here: the whole model resumes.
        args.model_name, image_name, text_name, text_path = text_path, None, None, None
    if not image_name and not text_name and not text_path:
        if (Path(args.model_name) / TOWERS_FILE).is_file():
            return load_model(args.model_name)
        return _plain_siglip(args)
    siglip_name = args.model_name
    image_name = image_name or siglip_name
    text_name = text_path or text_name or siglip_name
    text_backbone, text_kind, tokenizer = _text_backbone(text_name)
    if image_name == "merlin":
        layers, width = getattr(args, "merlin_layers", None) or (3, 8, 36, 3), getattr(args, "merlin_width", 64)
        backbone, image_kind = MerlinBackbone(layers=layers, width=width), "merlin"
        if getattr(args, "image_model_path", None):
            load_merlin_weights(backbone, args.image_model_path)
        else:
            warnings.warn("--image_model_name merlin without --image_model_path: the 3D tower starts from "
                          "random weights")
    else:
        backbone, _ = load_vision_tower(image_name)
        image_kind = "siglip" if _is_siglip(backbone.config) else "hf"
    text_probe = TextTower(text_backbone, text_kind)
    shared = args.projection_dim or (text_probe.feature_dim if text_kind == "siglip" else
                                     backbone.config.hidden_size if image_kind == "siglip" else text_probe.feature_dim)
    # A non-SigLIP image backbone's features are aligned to nothing: it always gets a head.
    image_head = shared if (image_kind != "siglip" or backbone.config.hidden_size != shared) else None
    image = ImageTower(backbone, image_kind, args.image_pooling, out_dim=image_head)
    text = TextTower(text_backbone, text_kind, out_dim=shared, use_mask=args.text_attention_mask)
    t = 1.0 / args.temperature if args.temperature else math.exp(PAPER_LOGIT_SCALE)
    # Shape [1], as SiglipModel's: FSDP shards no 0-d parameter.
    scale = nn.Parameter(torch.tensor([math.log(t)]))
    bias = nn.Parameter(torch.tensor([PAPER_LOGIT_BIAS]))
    if image_kind == "merlin":
        proc = VolumeProcessor(size=args.volume_size, clip_min=args.volume_clip[0], clip_max=args.volume_clip[1])
    else:
        proc = _image_processor(image_name, backbone, args.image_size)
    spec = {"image": {"source": str(getattr(args, "image_model_path", None) or image_name), "kind": image_kind,
                      "pooling": args.image_pooling},
            "text": {"source": str(text_name), "kind": text_kind, "use_mask": text.use_mask}, "shared_dim": shared}
    logger.info("towers: image %s (%s, %s pooling) -> %d, text %s (%s) -> %d; logit scale t=%.2f, bias %.1f",
                image_name, image_kind, {"hf": args.image_pooling, "merlin": "global average"}.get(image_kind, "attention"),
                image.out_dim,
                text_name, text_kind, text.out_dim, t, PAPER_LOGIT_BIAS)
    return ContrastiveModel(image, text, scale, bias, spec=spec), tokenizer, proc


_DECODER_TYPES = {"gemma", "gemma2", "gemma3", "gemma3_text", "llama", "mistral", "qwen2", "qwen3", "phi3"}


def _text_backbone(name):
    """(backbone, kind, tokenizer) of a text tower: a SigLIP's text half, a decoder LLM used the
    LLM2Vec way, or a BERT-style encoder. An LLM2Vec checkpoint whose folder is a PEFT adapter
    (the MNTP adapter) is merged into the base model it names."""
    from transformers.utils import find_adapter_config_file
    path = Path(str(name))
    base_name = name
    # By folder or by hub id (`McGill-NLP/LLM2Vec-*-mntp`): given an adapter's id, AutoModel
    # would load the base with the LoRA injected unmerged, and save_pretrained would then
    # write the adapter alone as the text tower.
    try:
        adapter_config = find_adapter_config_file(str(name))
    except (OSError, ValueError):  # neither a folder nor a hub id: AutoConfig below says so
        adapter_config = None
    if adapter_config:
        base_name = json.loads(Path(adapter_config).read_text())["base_model_name_or_path"]
    config = AutoConfig.from_pretrained(base_name)
    siglip = _is_siglip(config)
    tokenizer = load_tokenizer(name if (path / "tokenizer_config.json").is_file() else base_name, siglip=siglip)
    if siglip:
        return _siglip_text(name), "siglip", tokenizer
    arch = (getattr(config, "architectures", None) or [""])[0]
    if config.model_type in _DECODER_TYPES or arch.endswith("ForCausalLM"):
        # The checkpoint's own dtype (bf16 on the hub: 16 GB instead of 32 for an 8B tower);
        # the trainer makes whatever trains fp32 (training.precision.master_weights).
        backbone = AutoModel.from_pretrained(base_name)
        if base_name != name:
            # The MNTP adapter is merged in fp32, then stored back in the base's dtype: adding
            # B·A into bf16 weights rounds the delta away where it is small against W.
            from peft import PeftModel
            stored = backbone.dtype
            backbone = PeftModel.from_pretrained(backbone.float(), name).merge_and_unload().to(stored)
        # LLM2Vec's first step: every token attends to every other. transformers 5 builds a
        # bidirectional mask from this flag (the llm2vec package pins transformers <= 4.44).
        backbone.config.is_causal = False
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        return backbone, "llm2vec", tokenizer
    return AutoModel.from_pretrained(name), "bert", tokenizer


# LoRA on a SigLIP's two encoders: the attention projections and the MLP of every encoder
# layer. A bare "out_proj" would also match the vision pooling head's nn.MultiheadAttention,
# where peft's wrapper is bypassed (the module calls its weights directly) and LoRA silently
# does nothing; the regex keeps to `encoder.layers.N`.
SIGLIP_LORA_TARGETS = r".*(text_model|vision_model)\.encoder\.layers\.\d+\.(self_attn\.({mods})|mlp\.({mods}))"


def apply_lora(model: "ContrastiveModel", source: str, *, r: int, alpha: float, dropout: float,
               target_modules: str = "q_proj,k_proj,v_proj,out_proj,fc1,fc2") -> None:
    """Inject LoRA adapters (peft) in place into both towers of a pretrained SigLIP; only the
    adapters train (and the logit scale/bias, by flag). `source` is the checkpoint the merged
    export starts from."""
    from peft import LoraConfig, inject_adapter_in_model
    if model.siglip is None:
        raise ValueError("--lora_r applies to a pretrained SigLIP pair (--model_name); other towers train "
                         "their heads and backbones directly")
    mods = "|".join(m.strip() for m in target_modules.split(",") if m.strip())
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, bias="none",
                        target_modules=SIGLIP_LORA_TARGETS.format(mods=mods))
    inject_adapter_in_model(config, model.siglip)
    for name, p in model.siglip.named_parameters():
        p.requires_grad_("lora_" in name)
    model.lora = {"config": config, "source": str(source)}
    n = sum(p.numel() for n_, p in model.siglip.named_parameters() if "lora_" in n_)
    logger.info("LoRA r=%d alpha=%g on %s of both SigLIP encoders: %s adapter parameters", r, alpha, mods, f"{n:,}")


def save_lora_siglip(model: "ContrastiveModel", out: Path) -> None:
    """`lora_adapter/` (peft format) and, at `out`, the merged SiglipModel: the checkpoint's own
    weights plus B·A·alpha/r computed in fp32 on CPU (never merged into reduced-precision copies),
    with the trained logit scale and bias."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file
    siglip, source = model.siglip, model.lora["source"]
    (out / "lora_adapter").mkdir(parents=True, exist_ok=True)
    state = get_peft_model_state_dict(siglip)
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(out / "lora_adapter" / "adapter_model.safetensors"))
    cfg = model.lora["config"].to_dict()
    cfg["target_modules"] = model.lora["config"].target_modules
    cfg["base_model_name_or_path"] = source
    (out / "lora_adapter" / "adapter_config.json").write_text(json.dumps(cfg, indent=2, default=str))
    merged = SiglipModel.from_pretrained(source, dtype=torch.float32)
    sd = add_lora_deltas(merged.state_dict(), siglip)
    with torch.no_grad():
        sd["logit_scale"] = model.logit_scale.detach().to("cpu", sd["logit_scale"].dtype).reshape(sd["logit_scale"].shape)
        sd["logit_bias"] = model.logit_bias.detach().to("cpu", sd["logit_bias"].dtype).reshape(sd["logit_bias"].shape)
    merged.load_state_dict(sd, strict=True)
    merged.save_pretrained(out, safe_serialization=True)


# LoRA on a decoder LLM used as text tower: its attention and MLP projections, the modules
# LLM2Vec's own supervised stage adapts (r 16, alpha 2r, dropout 0.05 on its 8B towers).
DECODER_LORA_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


def apply_text_lora(model: "ContrastiveModel", source, *, r: int, alpha: float | None = None, dropout: float = 0.05,
                    target_modules: str = DECODER_LORA_TARGETS) -> None:
    """Inject LoRA adapters (peft) in place into a decoder text tower: its backbone trains only
    through them (an 8B full fine-tune needs its weights, gradients and AdamW state on the GPUs);
    the text head, the image side and the logit scale/bias train as their own flags say.
    `source`: the text tower the export merges the adapters into."""
    from peft import LoraConfig, inject_adapter_in_model
    if model.text.kind != "llm2vec":
        raise ValueError(f"--text_lora_r applies to a decoder LLM text tower (--text_model_path); this text tower "
                         f"is {model.text.kind!r} (LoRA on a pretrained SigLIP pair: --lora_r)")
    mods = [m.strip() for m in target_modules.split(",") if m.strip()]
    config = LoraConfig(r=r, lora_alpha=2 * r if alpha is None else alpha, lora_dropout=dropout, bias="none",
                        target_modules=mods)
    inject_adapter_in_model(config, model.text.backbone)
    for name, p in model.text.backbone.named_parameters():
        p.requires_grad_("lora_" in name)
    model.text_lora = {"config": config, "source": str(source)}
    n = sum(p.numel() for n_, p in model.text.backbone.named_parameters() if "lora_" in n_)
    logger.info("text LoRA r=%d alpha=%g on %s: %s adapter parameters", r, config.lora_alpha, ",".join(mods), f"{n:,}")


def save_lora_text(model: "ContrastiveModel", out: Path) -> None:
    """`out/lora_adapter/` (peft format) and, at `out`, the text backbone with its adapters
    merged, a plain text tower: B·A·alpha/r computed in fp32 on CPU and added to the frozen
    weights the run loaded (never merged into a reduced-precision copy), each stored in its
    own dtype."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file
    backbone, lora = model.text.backbone, model.text_lora
    (out / "lora_adapter").mkdir(parents=True, exist_ok=True)
    adapter = get_peft_model_state_dict(backbone)
    save_file({k: v.detach().cpu().contiguous() for k, v in adapter.items()},
              str(out / "lora_adapter" / "adapter_model.safetensors"))
    cfg = lora["config"].to_dict()
    cfg["target_modules"] = sorted(lora["config"].target_modules)
    cfg["base_model_name_or_path"] = lora["source"]
    (out / "lora_adapter" / "adapter_config.json").write_text(json.dumps(cfg, indent=2, default=str))
    state = {k.replace(".base_layer", ""): v.detach().to("cpu") for k, v in backbone.state_dict().items()
             if "lora_" not in k}
    add_lora_deltas(state, backbone)
    backbone.save_pretrained(out, state_dict=state, safe_serialization=True)


def _plain_siglip(args):
    if AutoConfig.from_pretrained(args.model_name).model_type == "siglip2":
        raise ValueError(f"{args.model_name}: a NaFlex SigLIP 2 (Siglip2Model: variable resolution, patch masks) "
                         "is not supported; use a fixed-resolution SigLIP 2 (google/siglip2-so400m-patch16-384 "
                         "and the like, which load as SiglipModel), or pass --image_model_name / --text_model_name")
    model = AutoModel.from_pretrained(args.model_name)  # stored dtype; trained parts become fp32 in the trainer
    for attr in ("vision_model", "text_model", "logit_scale", "logit_bias"):
        if not hasattr(model, attr):
            raise ValueError(f"{args.model_name}: {type(model).__name__} is not a SigLIP dual encoder "
                             f"(no .{attr}); Stage0 expects a SiglipModel checkpoint, or pass "
                             "--image_model_name / --text_model_name")
    if getattr(args, "temperature", None):
        warnings.warn("--temperature is ignored for a pretrained SigLIP pair: its learnt logit scale and bias "
                      "are kept (they set the sigmoid's operating point)")
    return _wrap_siglip(model, text_attention_mask=getattr(args, "text_attention_mask", False)), \
        load_tokenizer(args.model_name, siglip=True), AutoImageProcessor.from_pretrained(args.model_name)


def _wrap_siglip(model: SiglipModel, text_attention_mask=False) -> ContrastiveModel:
    image = ImageTower(model.vision_model, "siglip")
    text = TextTower(model.text_model, "siglip", use_mask=text_attention_mask)
    return ContrastiveModel(image, text, model.logit_scale, model.logit_bias, siglip=model,
                            spec={"image": {"kind": "siglip"}, "text": {"kind": "siglip"}})


def load_model(path, *, text_attention_mask=False):
    """(ContrastiveModel, tokenizer, image_processor) from a Stage0 output folder (a towers
    folder or a SiglipModel folder)."""
    path = Path(path)
    if not (path / TOWERS_FILE).is_file():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path}: not a Stage0 model folder (no {TOWERS_FILE} or config.json)")
        model = SiglipModel.from_pretrained(path, dtype=torch.float32)
        return (_wrap_siglip(model, text_attention_mask), load_tokenizer(path, siglip=True),
                AutoImageProcessor.from_pretrained(path))
    from safetensors.torch import load_file
    spec = json.loads((path / TOWERS_FILE).read_text())
    if spec["image"]["kind"] == "merlin":
        c = json.loads((path / IMAGE_DIR / "merlin_config.json").read_text())
        image_backbone = MerlinBackbone(layers=c["layers"], width=c["width"], num_classes=c["num_classes"])
        image_backbone.load_state_dict(load_file(str(path / IMAGE_DIR / "model.safetensors")), strict=True)
    else:
        image_backbone = _auto_backbone(path / IMAGE_DIR)
    text_backbone = _auto_backbone(path / TEXT_DIR)
    if spec["text"]["kind"] == "llm2vec":
        text_backbone.config.is_causal = False
    heads = load_file(str(path / HEADS_FILE))
    img_kind, txt_kind = spec["image"]["kind"], spec["text"]["kind"]
    image_head = spec["image_dim"] if any(k.startswith("image.") for k in heads) else None
    image = ImageTower(image_backbone, img_kind, spec["image"].get("pooling", "cls"), out_dim=image_head)
    text = TextTower(text_backbone, txt_kind, out_dim=spec["text_dim"], use_mask=spec["text"].get("use_mask", False))
    image.head.load_state_dict({k[6:]: v for k, v in heads.items() if k.startswith("image.")})
    text.head.load_state_dict({k[5:]: v for k, v in heads.items() if k.startswith("text.")})
    model = ContrastiveModel(image, text, nn.Parameter(heads["logit_scale"].reshape(1).clone()),
                             nn.Parameter(heads["logit_bias"].reshape(1).clone()), spec=spec)
    if spec["image"]["kind"] == "merlin":
        proc = VolumeProcessor.from_pretrained(path / IMAGE_DIR)
    else:
        proc = AutoImageProcessor.from_pretrained(path / IMAGE_DIR)
    tokenizer = load_tokenizer(path / TEXT_DIR, siglip=spec["text"]["kind"] == "siglip")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer, proc


def embed(model: ContrastiveModel, *, pixel_values=None, input_ids=None, attention_mask=None):
    """L2-normalised image and/or text embeddings (the inference CLI's and evaluation's entry)."""
    img = F.normalize(model.image(pixel_values), dim=-1) if pixel_values is not None else None
    txt = F.normalize(model.text(input_ids, attention_mask), dim=-1) if input_ids is not None else None
    return img, txt
