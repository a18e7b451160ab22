"""Loading a vision tower for the VLM from any checkpoint Stage0 or the hub provides (a
two-tower SigLIP/CLIP, a vision-only model, a Stage0 `final_model/` or `vision_encoder.bin`),
with its image processor and its image-token count. Every weight loads strictly: a tower that
would be partly random-initialised is refused."""
from __future__ import annotations

import contextlib
import logging
import warnings
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoImageProcessor, AutoModel
from transformers.models.auto.modeling_auto import MODEL_MAPPING

logger = logging.getLogger("siglip_med")

VISION_ENCODER_FILE = "vision_encoder.bin"  # Stage0's torch.save of the vision tower state dict
# How many non-patch tokens lead a tower's output: LLaVA's "default" strategy drops exactly one.
_CLS_TOWERS = {"dinov2", "clip_vision_model", "vit"}
_NO_CLS_TOWERS = {"siglip_vision_model", "siglip2_vision_model"}
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")


def _has_cls(config) -> bool:
    if config.model_type not in _CLS_TOWERS | _NO_CLS_TOWERS:
        # Guessing wrong either drops a real patch or feeds a CLS/register token as a patch.
        raise ValueError(f"vision tower type {config.model_type!r}: unknown whether it has a CLS token; "
                         f"supported: {sorted(_CLS_TOWERS | _NO_CLS_TOWERS)}")
    return config.model_type in _CLS_TOWERS


@contextlib.contextmanager
def transformers_errors_only():
    """transformers logs errors only for the duration (its loading reports and config chatter)."""
    from transformers.utils import logging as hf_logging
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def _checked_from_pretrained(cls, name_or_path, allow=None, **kw):
    # The loading report lists the unused half of a two-tower checkpoint (SigLIP's text tower)
    # as "unexpected"; that is intended here, while missing weights are checked below.
    with transformers_errors_only():
        model, info = cls.from_pretrained(name_or_path, output_loading_info=True, **kw)
    bad = {k: [n for n in v if not (allow and allow(n if isinstance(n, str) else n[0]))]
           for k, v in info.items() if k in ("missing_keys", "mismatched_keys")}
    bad = {k: v for k, v in bad.items() if v}
    if bad:
        raise RuntimeError(f"{name_or_path}: {cls.__name__} would be partly random-initialised: {bad}")
    if info.get("unexpected_keys"):
        logger.info("%s: %d weights not used by %s (e.g. %s)", name_or_path, len(info["unexpected_keys"]),
                    type(model).__name__, sorted(info["unexpected_keys"])[0])
    return model


def _match_prefix(state: dict, expected, prefix: str) -> dict:
    """transformers 4.x vision models keep their weights under `vision_model.`, 5.x without it;
    a `vision_encoder.bin` from either loads (strictly, so nothing else is glossed over)."""
    expected = set(expected)
    if set(state) == expected:
        return state
    added = {prefix + k: v for k, v in state.items()}
    stripped = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}
    return next((s for s in (added, stripped) if set(s) == expected), state)


def load_vision_tower(name_or_path, *, torch_dtype=None) -> tuple[nn.Module, bool]:
    """Return (vision model, has_cls_token) from a hub id or a local folder.

    Accepts a full SigLIP / CLIP checkpoint (its vision half is taken), a vision-only
    checkpoint (SiglipVisionModel, CLIPVisionModel, Dinov2Model / RadDino), a Stage0
    `final_model/`, or a folder holding only Stage0's `vision_encoder.bin` next to a config.json.
    """
    path = Path(str(name_or_path))
    if (path / "towers.json").is_file():  # a Stage0 towers folder (other image tower): its image_tower/
        name_or_path = path = path / "image_tower"
    config = AutoConfig.from_pretrained(name_or_path)
    vision_config = getattr(config, "vision_config", None) or config
    only_bin = (path.is_dir() and (path / VISION_ENCODER_FILE).exists()
                and not any((path / f).exists() for f in _WEIGHT_FILES))
    if only_bin:
        model = AutoModel.from_config(vision_config)
        state = torch.load(path / VISION_ENCODER_FILE, map_location="cpu", weights_only=True)
        model.load_state_dict(_match_prefix(state, model.state_dict().keys(),
                                            model.base_model_prefix + "."), strict=True)
        if torch_dtype is not None:
            model.to(torch_dtype)
    else:
        # The vision half of a two-tower checkpoint (SiglipModel -> SiglipVisionModel) loads by
        # its own class; its keys carry the same `vision_model.` prefix.
        cls = MODEL_MAPPING[type(vision_config)] if vision_config is not config else AutoModel
        kw = {"dtype": torch_dtype} if torch_dtype is not None else {}
        model = _checked_from_pretrained(cls, name_or_path, **kw)
    return model, _has_cls(vision_config)


def load_image_processor(name_or_path, vision_config):
    if (Path(str(name_or_path)) / "towers.json").is_file():
        name_or_path = Path(str(name_or_path)) / "image_tower"
    try:
        return AutoImageProcessor.from_pretrained(name_or_path)
    except (OSError, ValueError):
        if vision_config.model_type != "siglip_vision_model":
            raise
        warnings.warn(f"{name_or_path} has no image processor; using SigLIP's default "
                      f"({vision_config.image_size}px, mean=std=0.5)")
        from transformers import SiglipImageProcessor
        size = vision_config.image_size
        return SiglipImageProcessor(size={"height": size, "width": size})


def num_image_tokens(image_processor, vision_config) -> int:
    """Patches per image at the size the image processor produces (that size, not the config's
    image_size, sets the count: DINOv2 checkpoints say 518 but their processors crop 224)."""
    from PIL import Image
    pixels = image_processor(images=Image.new("RGB", (37, 29)), return_tensors="pt")["pixel_values"]
    h, w = pixels.shape[-2:]
    return (h // vision_config.patch_size) * (w // vision_config.patch_size)
