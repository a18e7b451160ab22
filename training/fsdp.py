"""FSDP2 (torch's fully_shard, through accelerate's `fsdp_version: 2` in scripts/accelerate/fsdp.yaml):
what the project adds to accelerate's wrapping.

accelerate's `prepare` shards the model: one unit per block class of the model's
`_no_split_modules`, the rest in the root unit (which keeps Gemma's tied embedding and LM head
together, as the wrapper the trainers hand it has no `get_input_embeddings`), trained parameters
fp32 and cast to bf16 when gathered. torch requires one dtype only among a unit's *trained*
parameters, so frozen parts stay in their stored bf16 beside fp32 trained ones.

What accelerate does not do for this project, and this module does:
- resume checkpoints of the trained tensors only (a torch distributed checkpoint: each process
  writes its own shards of them and of the AdamW state, nothing is gathered), instead of
  accelerate's sharded copy of the whole model, frozen towers included;
- exports: the full state dict gathered to the main process on CPU, shard by shard, so the
  export code writes the same plain Hugging Face folder as under DDP.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

SHARDED_DIR = "sharded"  # inside a resume checkpoint: the torch distributed checkpoint


def is_fsdp(accelerator) -> bool:
    from accelerate.utils import DistributedType
    return getattr(accelerator, "distributed_type", None) == DistributedType.FSDP


def full_state_dict(accelerator, module) -> dict | None:
    """Under FSDP: {name: full tensor on CPU} on the main process, {} on the others (every
    process must call it: each gathers its shards in turn). Otherwise None (read the module)."""
    if not is_fsdp(accelerator):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


@contextlib.contextmanager
def accelerate_saves_the_rest(accelerator):
    """Under FSDP, accelerate's save_state/load_state handle the schedulers, samplers, RNG and
    scaler only; the model and optimizer are the sharded checkpoint's (save_sharded). Yields
    (models, optimizers) as accelerate holds them, or None when not under FSDP."""
    if not is_fsdp(accelerator):
        yield None
        return
    held = (accelerator._models, accelerator._optimizers)
    for model in held[0]:
        resharded(model)
    accelerator._models, accelerator._optimizers = [], []
    try:
        yield held
    finally:
        accelerator._models, accelerator._optimizers = held


def resharded(module):
    """`module` with every unit's parameters back in their sharded form, the ones the optimizer
    holds. The root unit stays gathered after a forward until its backward (torch's default for
    it), so after a validation pass, which has no backward, its parameters are full tensors."""
    from torch.distributed.fsdp import FSDPModule
    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()
    return module


def save_sharded(folder, held, tensors: dict) -> None:
    """Every process writes its shards of `tensors` (the trained ones, {name: live tensor}) and
    of the optimizer state."""
    import torch.distributed.checkpoint as dcp
    dcp.save(_sharded_state(held, tensors), checkpoint_id=str(Path(folder) / SHARDED_DIR))


def load_sharded(folder, held, tensors: dict) -> None:
    """Load save_sharded's checkpoint in place, each process its own shards (resharded if the
    process count changed)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict
    path = Path(folder) / SHARDED_DIR
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: missing; this checkpoint was not written under FSDP")
    state = _sharded_state(held, tensors)
    dcp.load(state, checkpoint_id=str(path))
    models, optimizers = held
    for i, opt in enumerate(optimizers):
        set_optimizer_state_dict(models[0], opt, state[f"optimizer_{i}"])


def _sharded_state(held, tensors: dict) -> dict:
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    models, optimizers = held
    if len(models) != 1:
        raise ValueError(f"FSDP checkpoints expect one prepared model, found {len(models)}")
    return {"model": tensors, **{f"optimizer_{i}": get_optimizer_state_dict(models[0], opt)
                                 for i, opt in enumerate(optimizers)}}


def meta_copy(module):
    """A copy of `module` on the meta device, made without copying a single weight (each tensor
    of it is mapped to a meta tensor of its shape before the deep copy reaches it): the shape an
    export under FSDP fills with the gathered full weights (plain_copy). Made before `prepare`,
    while the module is still the model as built, without FSDP's hooks."""
    import copy

    import torch
    memo = {}
    for t in list(module.parameters()) + list(module.buffers()):
        meta = torch.empty_like(t, device="meta")
        memo[id(t)] = torch.nn.Parameter(meta, requires_grad=t.requires_grad) if isinstance(t, torch.nn.Parameter) else meta
    return copy.deepcopy(module, memo)


def plain_copy(shape, full: dict, live, also=()):
    """A plain module of meta_copy's `shape` holding the gathered `full` state dict (assigned:
    no second copy of the weights) and the `live` module's buffers that no state dict holds (the
    non-persistent ones: rotary frequencies, position ids; FSDP leaves buffers whole). A
    parameter shared under several names (a tied embedding and LM head) stays one parameter,
    also in the modules `also(copy)` names that hold some of its parameters outside its own tree
    (a SiglipModel both towers belong to)."""
    import copy
    plain = copy.deepcopy(shape)
    names, metas = {}, []  # {id of a meta parameter: every name it has}
    for name, p in plain.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
        metas.append(p)  # alive until the end, so that no id is reused
    extra = list(also(plain)) if also else []
    plain.load_state_dict(full, strict=True, assign=True)  # each name its own parameter now
    loaded = {}
    for i, (first, *others) in names.items():
        loaded[i] = plain.get_parameter(first)
        for name in others:
            owner, _, leaf = name.rpartition(".")
            plain.get_submodule(owner)._parameters[leaf] = loaded[i]
    for root in extra:
        for m in root.modules():
            for k, p in m._parameters.items():
                if p is not None and id(p) in loaded:
                    m._parameters[k] = loaded[id(p)]
    live_buffers = dict(live.named_buffers())
    for name, b in list(plain.named_buffers()):
        if b.is_meta:
            owner, _, leaf = name.rpartition(".")
            plain.get_submodule(owner)._buffers[leaf] = live_buffers[name].detach().to("cpu", copy=True)
    left = [n for root in [plain, *extra] for n, t in [*root.named_parameters(), *root.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"the gathered state dict left {len(left)} tensors unfilled, e.g. {left[:3]}")
    return plain
