"""Speed options every stage shares: attention kernel, gradient checkpointing, torch.compile,
and the watch on recompiles."""
from __future__ import annotations

import logging

import torch

logger = logging.getLogger("siglip_med")
_compiled_blocks = 0  # blocks compiled in this process; StepLogger watches for recompiles then


def check_attn_implementation(impl: str) -> None:
    """Refuse, before any model loads, a kernel that is not installed here."""
    from transformers.utils import import_utils as iu
    available = {"flash_attention_2": iu.is_flash_attn_2_available,
                 "flash_attention_3": getattr(iu, "is_flash_attn_3_available", lambda: False)}
    if impl in available and not available[impl]():
        raise SystemExit(f"error: --attn_implementation {impl} needs the flash-attn package and a CUDA GPU "
                         "it supports; use --attn_implementation sdpa (the default)")


def hf_models(module: torch.nn.Module) -> list:
    """The outermost Hugging Face models inside `module` (itself included)."""
    from transformers import PreTrainedModel
    found, stack = [], [module]
    while stack:
        m = stack.pop()
        if isinstance(m, PreTrainedModel):
            found.append(m)
        else:
            stack.extend(m.children())
    return found


def set_attention(module: torch.nn.Module, impl: str) -> None:
    """Every Hugging Face model inside `module` computes attention with `impl`. Models that
    have no such kernel (plain torch towers such as Merlin's, or a model that does not support
    it) keep theirs, with a warning."""
    for m in hf_models(module):
        try:
            m.set_attn_implementation(impl)
        except (ValueError, ImportError) as e:
            logger.warning("%s keeps attention %s: %s", type(m).__name__,
                           getattr(m.config, "_attn_implementation", "?"), str(e).splitlines()[0])


def _blocks(module: torch.nn.Module) -> list:
    from transformers.modeling_layers import GradientCheckpointingLayer
    return [m for m in module.modules() if isinstance(m, GradientCheckpointingLayer)]


def enable_gradient_checkpointing(modules) -> None:
    """Recompute in backward the blocks of each module that gradients flow through.

    Hugging Face blocks checkpoint only in train() mode, which would leave a frozen LM that
    gradients pass through (Stage1; Stage2 without --unfreeze_llm) storing every activation.
    So a pre-hook on each module sets its blocks' own `training` flag to "gradients are being
    recorded" at every call: frozen blocks recompute too, their dropout submodules keep their
    mode, and under no_grad (validation, generate) the blocks run plainly and keep their KV
    cache. Non-reentrant, so LoRA adapters and frozen inputs still get gradients."""
    for module in modules:
        for m in hf_models(module):
            if not m.supports_gradient_checkpointing:
                logger.warning("%s does not support gradient checkpointing", type(m).__name__)
                continue
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        blocks = _blocks(module)

        def mark(_module, _inputs, blocks=blocks):
            grad = torch.is_grad_enabled()
            for blk in blocks:
                blk.training = grad
        module.register_forward_pre_hook(mark)


def compile_modules(modules, args) -> None:
    """torch.compile block by block, in place (`nn.Module.compile`): each transformer block
    (or a whole module that has none, e.g. a plain-torch tower) is one graph, so shapes that
    change per batch recompile small graphs, checkpointing hooks stay outside them, and
    state-dict keys, checkpoints and exports are unchanged."""
    global _compiled_blocks
    if not args.torch_compile:
        return
    n = 0
    for module in modules:
        for m in _blocks(module) or [module]:
            m.compile(backend=args.torch_compile_backend, mode=args.torch_compile_mode)
            n += 1
    _compiled_blocks += n
    logger.info("torch.compile (%s%s): %d blocks of %s", args.torch_compile_backend,
                f", {args.torch_compile_mode}" if args.torch_compile_mode else "", n,
                ", ".join(type(m).__name__ for m in modules))


def speed_options(args, model, *, grad_flow=(), hot=()) -> None:
    """The speed flags every stage shares: attention kernel on every HF model in `model`,
    gradient checkpointing on the modules gradients flow through (`grad_flow`), torch.compile
    on the modules every step runs (`hot`). Call before accelerator.prepare."""
    set_attention(model, args.attn_implementation)
    if args.gradient_checkpointing:
        enable_gradient_checkpointing(grad_flow)
    compile_modules(hot, args)


# Not torch's recompile log alone (TORCH_LOGS=recompiles): it reports every compile, the warm-up's
# included, and has no count the benchmark can read; it is turned on after the warm-up for the reasons.
class CompileWatch:
    """Counts the graphs torch.compile builds after the warm-up steps. Shapes that change from
    batch to batch (a short last batch, another padded length) recompile; after the warm-up
    that should stop, and a graph count that still grows is reported once."""

    def __init__(self, enabled: bool, warmup_steps: int = 3):
        self.enabled, self.warmup, self.base, self.warned = enabled, warmup_steps, None, False

    @staticmethod
    def graphs() -> int:
        from torch._dynamo.utils import counters
        return int(counters["stats"]["unique_graphs"])

    def step(self, steps_done: int) -> None:
        if not self.enabled:
            return
        if steps_done == self.warmup:
            self.base = self.graphs()
            logger.info("torch.compile: %d graphs after %d warm-up steps", self.base, steps_done)
            torch._logging.set_logs(recompiles=True)  # from now on torch names each recompile's reason
        elif self.base is not None and not self.warned and self.graphs() > self.base:
            self.warned = True
            logger.warning("torch.compile recompiled after the warm-up (%d graphs, %d at warm-up): the "
                           "input shapes vary; pad to fixed lengths to avoid the cost", self.graphs(), self.base)

    def recompiles(self) -> int | None:
        return None if self.base is None else self.graphs() - self.base
