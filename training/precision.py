"""Precision: fp32 master weights for what trains, the stored dtype for what does not."""
from __future__ import annotations

import contextlib
import logging

import torch

logger = logging.getLogger("siglip_med")


def resolve_mixed_precision(choice: str) -> str:
    """`--mixed_precision` given alone: bf16 where the device computes it, else fp16."""
    if choice != "auto":
        return choice
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16"


def master_weights(model: torch.nn.Module, mixed_precision: str) -> dict[str, torch.dtype]:
    """Every parameter that trains becomes fp32, whatever dtype its checkpoint was stored in.

    transformers 5 loads a checkpoint in its stored dtype, and the hub stores Gemma 3, SigLIP
    and MedGemma in bf16. AdamW on bf16 weights rounds most updates away: at lr 2e-5 a weight
    of magnitude 2^-6 or more never moves (bf16 keeps 8 significant bits), so a full fine-tune
    silently trains nothing. Autocast still computes in bf16; only storage changes.

    Frozen weights keep their stored dtype under bf16 autocast (half the memory). Under
    `--mixed_precision no` or fp16 they become fp32: GPUs without bf16 (V100, T4) cannot
    compute in it, and fp16 storage overflows Gemma's activations. Buffers (BatchNorm
    statistics) follow their module's parameters. Returns {name: stored dtype} of every tensor
    changed, so an export can give back the checkpoint's dtypes."""
    changed: dict[str, torch.dtype] = {}
    low = (torch.bfloat16, torch.float16)
    for mod_name, module in model.named_modules():
        own = list(module.named_parameters(recurse=False))
        trains = any(p.requires_grad for _, p in own)
        for name, p in own:
            if p.dtype in low and (p.requires_grad or mixed_precision != "bf16"):
                changed[f"{mod_name}.{name}".lstrip(".")] = p.dtype
                p.data = p.data.float()
        for name, b in module.named_buffers(recurse=False):
            if b.dtype in low and (trains or mixed_precision != "bf16"):
                changed[f"{mod_name}.{name}".lstrip(".")] = b.dtype
                setattr(module, name, b.float())
    if changed:
        logger.info("fp32 master weights: %d tensors stored in %s cast to float32 (%s)", len(changed),
                    "/".join(sorted({str(d).replace("torch.", "") for d in changed.values()})),
                    "trained ones" if mixed_precision == "bf16" else "every tensor, for --mixed_precision "
                    + mixed_precision)
    return changed


@contextlib.contextmanager
def frozen_in_stored_dtypes(model: torch.nn.Module, stored: dict[str, torch.dtype]):
    """Frozen tensors that master_weights widened, back in their checkpoint dtype for the
    duration (an export then weighs what the base checkpoint weighs). Exact both ways: they
    never trained, and bf16 -> fp32 -> bf16 is lossless."""
    tensors = dict(model.named_parameters())
    tensors.update(dict(model.named_buffers()))
    narrowed = [(t, stored[n]) for n, t in tensors.items() if n in stored and not t.requires_grad]
    for t, dtype in narrowed:
        t.data = t.data.to(dtype)
    try:
        yield model
    finally:
        for t, _ in narrowed:
            t.data = t.data.float()


def trained_dtypes(model: torch.nn.Module) -> str:
    """'float32' (or each dtype) of the parameters that train, for logs and benchmarks."""
    found = sorted({str(p.dtype).replace("torch.", "") for p in model.parameters() if p.requires_grad})
    return "/".join(found) or "none"
