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

from projectors import load_vision_tower

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
        self.head = nn.Linear(width, out_dim) if out_dim else nn.Identity()
        self.out_dim = out_dim or width

    def forward(self, pixel_values):
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


class TextTower(nn.Module):
    """(input_ids, attention_mask) -> [B, dim], as backbone features then a head.
    SigLIP text: its pooled last position, max-length padding, no mask unless asked (as it was
    trained). BERT-style: the mean over real tokens."""

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
        mask = attention_mask if self.use_mask else None
        out = self.backbone(input_ids=input_ids, attention_mask=mask)
        if self.kind == "siglip":
            return out.pooler_output
        m = attention_mask.unsqueeze(-1).to(out.last_hidden_state.dtype)
        return (out.last_hidden_state * m).sum(1) / m.sum(1).clamp(min=1)

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

    @property
    def siglip(self):
        return self._siglip[0]

    @property
    def vision_model(self):  # the trainer's names for what trains
        return self.image

    @property
    def text_model(self):
        return self.text

    def save_pretrained(self, out_dir, tokenizer=None, image_processor=None) -> None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        backbone = self.image.backbone
        torch.save({k: v.detach().cpu() for k, v in backbone.state_dict().items()}, out / VISION_ENCODER_FILE)
        if self.siglip is not None:
            self.siglip.save_pretrained(out, safe_serialization=True)
            for obj in (tokenizer, image_processor):
                if obj is not None:
                    obj.save_pretrained(out)
            return
        from safetensors.torch import save_file
        backbone.save_pretrained(out / IMAGE_DIR, safe_serialization=True)
        self.text.backbone.save_pretrained(out / TEXT_DIR, safe_serialization=True)
        if image_processor is not None:
            image_processor.save_pretrained(out / IMAGE_DIR)
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

def _siglip_text(name):
    """The text half of a SigLIP checkpoint (or a text-only one) as a SiglipTextModel: its keys
    carry the same `text_model.` prefix, so only the text weights are read."""
    from projectors import _checked_from_pretrained
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
        from projectors import load_image_processor
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
    if not image_name and not text_name:
        if (Path(args.model_name) / TOWERS_FILE).is_file():
            return load_model(args.model_name)
        return _plain_siglip(args)
    siglip_name = args.model_name
    image_name = image_name or siglip_name
    text_name = text_name or siglip_name
    text_cfg = AutoConfig.from_pretrained(text_name)
    if _is_siglip(text_cfg):
        text_backbone, text_kind = _siglip_text(text_name), "siglip"
    else:
        text_backbone, text_kind = AutoModel.from_pretrained(text_name), "bert"
    tokenizer = AutoTokenizer.from_pretrained(text_name)
    backbone, _ = load_vision_tower(image_name)
    image_kind = "siglip" if _is_siglip(backbone.config) else "hf"
    text_probe = TextTower(text_backbone, text_kind)
    shared = args.projection_dim or (text_probe.feature_dim if text_kind == "siglip" else
                                     backbone.config.hidden_size if image_kind == "siglip" else text_probe.feature_dim)
    # A non-SigLIP image backbone's features are aligned to nothing: it always gets a head.
    image_head = shared if (image_kind == "hf" or backbone.config.hidden_size != shared) else None
    image = ImageTower(backbone, image_kind, args.image_pooling, out_dim=image_head)
    text = TextTower(text_backbone, text_kind, out_dim=shared, use_mask=args.text_attention_mask)
    t = 1.0 / args.temperature if args.temperature else math.exp(PAPER_LOGIT_SCALE)
    scale = nn.Parameter(torch.tensor(math.log(t)))
    bias = nn.Parameter(torch.tensor(PAPER_LOGIT_BIAS))
    proc = _image_processor(image_name, backbone, args.image_size)
    spec = {"image": {"source": str(image_name), "kind": image_kind, "pooling": args.image_pooling},
            "text": {"source": str(text_name), "kind": text_kind, "use_mask": text.use_mask}, "shared_dim": shared}
    logger.info("towers: image %s (%s, %s pooling) -> %d, text %s (%s) -> %d; logit scale t=%.2f, bias %.1f",
                image_name, image_kind, args.image_pooling if image_kind == "hf" else "attention", image.out_dim,
                text_name, text_kind, text.out_dim, t, PAPER_LOGIT_BIAS)
    return ContrastiveModel(image, text, scale, bias, spec=spec), tokenizer, proc


def _plain_siglip(args):
    model = AutoModel.from_pretrained(args.model_name, dtype=torch.float32)
    for attr in ("vision_model", "text_model", "logit_scale", "logit_bias"):
        if not hasattr(model, attr):
            raise ValueError(f"{args.model_name}: {type(model).__name__} is not a SigLIP dual encoder "
                             f"(no .{attr}); Stage0 expects a SiglipModel checkpoint, or pass "
                             "--image_model_name / --text_model_name")
    if getattr(args, "temperature", None):
        warnings.warn("--temperature is ignored for a pretrained SigLIP pair: its learnt logit scale and bias "
                      "are kept (they set the sigmoid's operating point)")
    return _wrap_siglip(model, text_attention_mask=getattr(args, "text_attention_mask", False)), \
        AutoTokenizer.from_pretrained(args.model_name), AutoImageProcessor.from_pretrained(args.model_name)


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
        return (_wrap_siglip(model, text_attention_mask), AutoTokenizer.from_pretrained(path),
                AutoImageProcessor.from_pretrained(path))
    from safetensors.torch import load_file
    spec = json.loads((path / TOWERS_FILE).read_text())
    image_backbone = _auto_backbone(path / IMAGE_DIR)
    text_backbone = _auto_backbone(path / TEXT_DIR)
    heads = load_file(str(path / HEADS_FILE))
    img_kind, txt_kind = spec["image"]["kind"], spec["text"]["kind"]
    image_head = heads["image.weight"].shape[0] if "image.weight" in heads else None
    image = ImageTower(image_backbone, img_kind, spec["image"].get("pooling", "cls"), out_dim=image_head)
    text = TextTower(text_backbone, txt_kind, out_dim=spec["text_dim"], use_mask=spec["text"].get("use_mask", False))
    image.head.load_state_dict({k[6:]: v for k, v in heads.items() if k.startswith("image.")})
    text.head.load_state_dict({k[5:]: v for k, v in heads.items() if k.startswith("text.")})
    model = ContrastiveModel(image, text, nn.Parameter(heads["logit_scale"][0].clone()),
                             nn.Parameter(heads["logit_bias"][0].clone()), spec=spec)
    return (model, AutoTokenizer.from_pretrained(path / TEXT_DIR), AutoImageProcessor.from_pretrained(path / IMAGE_DIR))


def embed(model: ContrastiveModel, *, pixel_values=None, input_ids=None, attention_mask=None):
    """L2-normalised image and/or text embeddings (the inference CLI's and evaluation's entry)."""
    img = F.normalize(model.image(pixel_values), dim=-1) if pixel_values is not None else None
    txt = F.normalize(model.text(input_ids, attention_mask), dim=-1) if input_ids is not None else None
    return img, txt
