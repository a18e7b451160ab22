"""The MLP projector between the vision tower and the LM, its folder (`projection_layer/`) and
the record of the tower it was aligned to. The VLM it sits in is assembled in `vlm.py`."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from torch import nn
from transformers.activations import ACT2FN

PROJECTOR_DIR = "projection_layer"
PROJECTOR_WEIGHTS = "projector.safetensors"


class MLPProjector(nn.Module):
    """Linear (act Linear)*: depth 2 has exactly the parameter names of LLaVA's
    `LlavaMultiModalProjector` (`linear_1`, `act`, `linear_2`), so its weights load there."""

    def __init__(self, in_dim: int, out_dim: int, depth: int = 2, act: str = "gelu"):
        super().__init__()
        if depth < 1:
            raise ValueError(f"projector depth must be >= 1, got {depth}")
        self.in_dim, self.out_dim, self.depth, self.act_name = in_dim, out_dim, depth, act
        self.linear_1 = nn.Linear(in_dim, out_dim)
        if depth > 1:
            self.act = ACT2FN[act]
        for i in range(2, depth + 1):
            setattr(self, f"linear_{i}", nn.Linear(out_dim, out_dim))

    def forward(self, x):
        x = self.linear_1(x)
        for i in range(2, self.depth + 1):
            x = getattr(self, f"linear_{i}")(self.act(x))
        return x

    def config_dict(self) -> dict:
        return {"in_dim": self.in_dim, "out_dim": self.out_dim, "depth": self.depth, "act": self.act_name}


def projector_of(model) -> nn.Module:
    """The projector of an assembled VLM (a LlavaForConditionalGeneration)."""
    return model.model.multi_modal_projector


def _projector_config(model) -> dict:
    proj = projector_of(model)
    if isinstance(proj, MLPProjector):
        return proj.config_dict()
    return {"in_dim": proj.linear_1.in_features, "out_dim": proj.linear_2.out_features, "depth": 2,
            "act": model.config.projector_hidden_act}


def tower_fingerprint(tower) -> str:
    """A content hash of a vision tower's weights. Taken over the weights rounded to bf16, so a
    tower stored in bf16 for training (Stage1) and the same checkpoint in fp32 (Stage2, the CLI)
    agree, while any fine-tune changes it."""
    import hashlib
    h = hashlib.sha256()
    for k, v in sorted(tower.state_dict().items()):
        h.update(f"{k}:{tuple(v.shape)};".encode())
        h.update(v.detach().to("cpu", torch.bfloat16).contiguous().view(torch.int16).numpy().tobytes())
    return h.hexdigest()[:24]


def recorded_tower(projector_dir) -> dict | None:
    """{"source", "sha256"} of the tower a projector was trained with, if its folder says."""
    path = Path(projector_dir)
    if (path / PROJECTOR_DIR).is_dir():
        path = path / PROJECTOR_DIR
    try:
        return json.loads((path / "config.json").read_text()).get("vision_tower")
    except (OSError, ValueError):
        return None


def check_tower(model, record: dict | None, given: str, *, what: str, override_flag: str, allow: bool) -> None:
    """Refuse to pair a projector with a vision tower other than the one it was aligned to: the
    dimensions may match while the features mean something else."""
    if not record or not record.get("sha256"):
        return
    got = tower_fingerprint(model.model.vision_tower)
    if got == record["sha256"]:
        return
    msg = (f"{what} was trained with the vision tower {record.get('source')!r} (weights {record['sha256']}), "
           f"but this run loaded {given!r} (weights {got}): the projector would read features it was never "
           f"aligned to. Leave --vision_model_name out to use the recorded tower, or pass {override_flag} "
           f"to pair them anyway.")
    if not allow:
        raise ValueError(msg)
    warnings.warn(msg.split(": the projector")[0] + f"; {override_flag} given, going on")


def load_projector(path) -> MLPProjector:
    """Read `projection_layer/` (or the VLM folder holding it) back into an MLPProjector."""
    path = Path(path)
    if (path / PROJECTOR_DIR).is_dir():
        path = path / PROJECTOR_DIR
    cfg = json.loads((path / "config.json").read_text())
    proj = MLPProjector(cfg["in_dim"], cfg["out_dim"], depth=cfg["depth"], act=cfg.get("act", "gelu"))
    if (path / PROJECTOR_WEIGHTS).exists():
        from safetensors.torch import load_file
        state = load_file(str(path / PROJECTOR_WEIGHTS))
    else:
        state = torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    proj.load_state_dict(state, strict=True)
    return proj
