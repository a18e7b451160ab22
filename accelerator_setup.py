"""Accelerator, logging and checkpoint plumbing shared by every stage.

One place decides: mixed precision, gradient accumulation, seeding, which tracker logs
(wandb / tensorboard / none), and how resume checkpoints are written, rotated and found.
Only the main process prints, logs and writes files.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import shutil
import signal
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed

# The flags every training CLI shares are defined in cli.py, which argparse reads before torch loads.
from cli import ATTN_IMPLEMENTATIONS, add_common_args  # noqa: E402,F401

logger = logging.getLogger("siglip_med")

CHECKPOINT_DIR = "checkpoints"
_STATE_FILE = "trainer_state.json"


def _tracker(args, project_dir: Path) -> str | None:
    choice = getattr(args, "report_to", "none")
    if choice == "wandb":
        try:
            import wandb  # noqa: F401
            # Without a login or WANDB_MODE, wandb would stop and ask on stdin; offline keeps
            # the run and can be synced later.
            if not (os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE")
                    or Path.home().joinpath(".netrc").exists()):
                os.environ["WANDB_MODE"] = "offline"
                warnings.warn("wandb: no login found; logging offline (WANDB_MODE=offline). "
                              "Run `wandb sync` later or set WANDB_API_KEY.")
            return "wandb"
        except ImportError:
            warnings.warn("wandb is not installed; falling back to tensorboard")
            choice = "tensorboard"
    if choice == "tensorboard":
        try:
            import torch.utils.tensorboard  # noqa: F401
            return "tensorboard"
        except ImportError:
            warnings.warn("tensorboard is not installed; metrics go to the console and "
                          f"{project_dir}/metrics.jsonl only")
    return None


# Which distributed engine serves which stage. A pair not listed stops the run before any
# model is loaded. FSDP2 (scripts/accelerate/fsdp.yaml) trains, but the exports write from the
# main process alone, which sharded parameters cannot do yet; DeepSpeed ZeRO-2 shards the
# optimizer state and gradients, which is what a full fine-tune of a 4B-12B Gemma needs.
WORKING_ENGINES = "one process (scripts/accelerate/single.yaml), DDP (ddp.yaml), DeepSpeed ZeRO-2 (deepspeed_zero2.yaml)"


def check_engine(accelerator, stage: str, args) -> None:
    """Refuse an engine x stage pair that cannot work, naming the ones that do."""
    from accelerate.utils import DistributedType
    engine = accelerator.distributed_type
    reason = None
    if engine == DistributedType.FSDP:
        reason = ("its exports are written by the main process from full weights, which FSDP "
                  "shards across processes")
    elif engine == DistributedType.DEEPSPEED and getattr(args, "train_ve_first_epoch", False):
        reason = ("--train_ve_first_epoch stops training the vision tower after epoch 1, and a "
                  "DeepSpeed engine's trained parameters are fixed when it is built")
    if reason:
        raise SystemExit(f"error: {stage} cannot run under {engine.value}: {reason}. "
                         f"Engines that work: {WORKING_ENGINES}.")


def setup_accelerator_and_logging(args, stage: str | None = None) -> Accelerator:
    """Build the Accelerator, refuse an engine the stage cannot use (before any model loads),
    seed everything, start the tracker on the main process."""
    out = Path(args.output_dir)
    args.mixed_precision = resolve_mixed_precision(args.mixed_precision)
    tracker = _tracker(args, out)
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision,
        # The trainers group micro-batches into windows themselves (they need every micro-batch
        # of a step for the contrastive negatives); accelerate and DeepSpeed must still know the
        # count, or DeepSpeed steps on every micro-batch. See OptimizerStep.
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=tracker,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
        # A seedable sampler makes the shuffle order a function of (seed, epoch), which is
        # what lets a resumed run see exactly the batches an uninterrupted run would.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    if stage is not None:
        check_engine(accelerator, stage, args)
    check_attn_implementation(getattr(args, "attn_implementation", "sdpa"))
    ds = accelerator.state.deepspeed_plugin
    if ds is not None:
        # --max_grad_norm is the one source of truth; DeepSpeed clips inside its engine step.
        ds.deepspeed_config["gradient_clipping"] = float(max(args.max_grad_norm, 0.0))
    set_seed(args.seed, device_specific=False)
    level = getattr(logging, getattr(args, "log_level", "info").upper())
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stderr, level=level if accelerator.is_main_process else logging.ERROR, force=True)
    # accelerate logs a line per file of every checkpoint ("[RANK 0] Saving ..."): most of a
    # run's log. Our own line per checkpoint says where it went.
    logging.getLogger("accelerate").setLevel(logging.DEBUG if level <= logging.DEBUG else logging.WARNING)
    # The process count sets the global batch and the data order a resume must continue.
    args.num_processes = accelerator.num_processes
    check_output_dir(args)  # before args.json is rewritten, on every process alike
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if args.overwrite_output_dir:
            _move_previous_run_aside(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "args.json").write_text(json.dumps(vars(args), indent=2, default=str))
    if tracker is not None:
        init_kwargs = {"wandb": {"name": args.run_name}} if tracker == "wandb" else {}
        try:
            accelerator.init_trackers(getattr(args, "wandb_project", "siglip-med"),
                                      config={k: v for k, v in vars(args).items()
                                              if isinstance(v, (int, float, str, bool))},
                                      init_kwargs=init_kwargs)
        except Exception as e:  # a tracker must never kill a training run
            warnings.warn(f"could not start {tracker} ({e}); logging to metrics.jsonl only")
            accelerator.log_with = []
            accelerator.trackers = []
    logger.info("device=%s processes=%d mixed_precision=%s", accelerator.device,
                accelerator.num_processes, accelerator.mixed_precision)
    return accelerator


# What a resumed run must share with the run that wrote the checkpoints: the model, the data
# and the optimiser. A longer --num_epochs / --max_steps is honoured (the run continues to the
# new target); logging, workers and the like may change too.
_RUN_DEFINING = ("model_name", "image_model_name", "text_model_name", "text_model_path", "image_model_path",
                 "vision_model_name", "llm_name", "stage1_projector_path", "train_json", "val_json",
                 "label_column", "learning_rate", "weight_decay", "batch_size", "gradient_accumulation_steps",
                 "lr_scheduler", "seed", "lora_r", "text_lora_r", "freeze_text_encoder", "num_processes",
                 "freeze_image_backbone", "unfreeze_llm", "unfreeze_projection_layer", "train_ve_first_epoch")


def _move_previous_run_aside(out: Path) -> Path | None:
    """--overwrite_output_dir: the old run's whole folder (checkpoints, best_model/ with its val
    loss, metrics.jsonl, exports) goes to a dated sibling, named in the log. Deleting only its
    checkpoints left best_model/ and final_model/ beside the new run and appended to its
    metrics.jsonl; deleting anything before the new run's data check passed lost the old run
    to a typo. Nothing is deleted: remove the sibling when it is no longer wanted."""
    if not out.is_dir() or not any(out.iterdir()):
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside = out.with_name(f"{out.name}.previous-{stamp}")
    n = 1
    while aside.exists():
        n += 1
        aside = out.with_name(f"{out.name}.previous-{stamp}-{n}")
    out.rename(aside)
    logger.warning("--overwrite_output_dir: the previous run in %s was moved to %s (nothing deleted)", out, aside)
    return aside


def check_output_dir(args) -> None:
    """An output folder holding another run is never reused silently: a fresh run (no
    --resume_from_checkpoint) into a folder with checkpoints or a final model refuses to start,
    as does a `latest` resume whose model, data or schedule differ from the saved run's, each
    naming what differs; --overwrite_output_dir starts over."""
    out = Path(args.output_dir)
    _check_explicit_checkpoint(args)
    if getattr(args, "overwrite_output_dir", False) or not out.is_dir():
        return
    has_run = bool(list_checkpoints(out)) or (out / "final_model").is_dir()
    if not has_run:
        return
    fix = "pass --overwrite_output_dir to start over there, or choose another --output_dir"
    if not args.resume_from_checkpoint:
        raise SystemExit(f"error: {out} holds another run's checkpoints or final_model/; a fresh run there would "
                         f"mix with them (rotation would delete its own newest checkpoints). {fix}; or resume it "
                         "with --resume_from_checkpoint latest.")
    saved = out / "args.json"
    if args.resume_from_checkpoint == "latest" and saved.is_file() and list_checkpoints(out):
        changed = _changed_settings(saved, args)
        if changed:
            raise SystemExit(f"error: --resume_from_checkpoint latest would continue the run in {out}, but this run "
                             f"differs from it: {'; '.join(changed)}. {fix}.")


def _changed_settings(saved_args: Path, args) -> list[str]:
    before = json.loads(saved_args.read_text())
    now = json.loads(json.dumps(vars(args), default=str))
    return [f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in _RUN_DEFINING
            if k in now and k in before and before[k] != now[k]]


def _check_explicit_checkpoint(args) -> None:
    """A checkpoint path given explicitly must come from a run with this run's model, data,
    optimiser and process count; otherwise it would be half-loaded (shapes that happen to fit)
    or resumed onto another data order. Refused before anything loads, naming what differs."""
    given = args.resume_from_checkpoint
    if not given or given == "latest":
        return
    ckpt = Path(given)
    saved = ckpt.parent.parent / "args.json"
    if ckpt.parent.name != CHECKPOINT_DIR or not saved.is_file():
        return
    changed = _changed_settings(saved, args)
    if changed:
        raise SystemExit(f"error: --resume_from_checkpoint {ckpt} was written by a run with other settings: "
                         f"{'; '.join(changed)}. Resume it with that run's settings (see {saved}), or start "
                         "fresh without --resume_from_checkpoint.")


def warn_if_nothing_to_train(step: int, total_steps: int, output_dir) -> None:
    """A resumed run that is already complete trains 0 steps: say so rather than pass silently."""
    if step >= total_steps:
        logger.warning("the run in %s already reached step %d of %d: nothing to train. Raise --num_epochs or "
                       "--max_steps to continue it, or pass --overwrite_output_dir to start over.",
                       output_dir, step, total_steps)


def log_metrics(accelerator: Accelerator, metrics: dict, step: int) -> None:
    """Send to the tracker and append to OUTPUT_DIR/metrics.jsonl (main process only)."""
    metrics = {k: (v.item() if torch.is_tensor(v) else v) for k, v in metrics.items()}
    if accelerator.trackers:
        accelerator.log(metrics, step=step)
    if accelerator.is_main_process:
        path = Path(accelerator.project_dir) / "metrics.jsonl"
        with path.open("a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")


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


# ----------------------------------------------------------------- speed options, every stage
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


_compiled_blocks = 0  # blocks compiled in this process; StepLogger watches for recompiles then


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
        elif self.base is not None and not self.warned and self.graphs() > self.base:
            self.warned = True
            logger.warning("torch.compile recompiled after the warm-up (%d graphs, %d at warm-up): the "
                           "input shapes vary; pad to fixed lengths to avoid the cost", self.graphs(), self.base)

    def recompiles(self) -> int | None:
        return None if self.base is None else self.graphs() - self.base


def make_scheduler(optimizer, args, total_steps: int):
    from transformers import get_scheduler
    warmup = args.warmup_steps if args.warmup_steps is not None else math.ceil(args.warmup_ratio * total_steps)
    if args.lr_scheduler == "one_cycle":
        # The knee seed's schedule. No momentum cycling: AdamW's beta1 stays as configured.
        # OneCycleLR peaks at step warmup - 1 and its warm-up phase must span at least one
        # step, so it always warms up for 2 or more steps: one step (a short run's ratio rounded
        # up) would make the phase zero steps long and divide by zero at the first step. It
        # also keeps one step to anneal over.
        # A run of fewer than 3 steps has room for neither: it only anneals.
        pct = min(max(warmup, 2), total_steps - 1) / total_steps if total_steps >= 3 else 1e-6
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=[g["lr"] for g in optimizer.param_groups], total_steps=max(total_steps, 1),
            pct_start=min(max(pct, 1e-6), 0.999), anneal_strategy="cos", cycle_momentum=False)
    name = {"constant": "constant_with_warmup"}.get(args.lr_scheduler, args.lr_scheduler)
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


def steps_per_epoch(num_batches: int, grad_accum: int) -> int:
    return math.ceil(num_batches / grad_accum)


def plan_steps(args, per_epoch: int) -> tuple[int, int]:
    """(total optimizer steps, epochs the loop runs), the same in every stage. `--max_steps`
    is the total number of optimizer steps: it wins over `--num_epochs`, repeating epochs as
    needed (the last one possibly cut short), and the LR schedule spans exactly those steps.
    Without it, `--num_epochs` full epochs."""
    if args.max_steps:
        return args.max_steps, math.ceil(args.max_steps / max(per_epoch, 1))
    return per_epoch * args.num_epochs, args.num_epochs


# ---------------------------------------------------------------- resume checkpoints

_last_saved: dict = {}  # (output dir, step) of this process's newest save


def save_checkpoint(accelerator: Accelerator, output_dir, step: int, state: dict,
                    total_limit: int | None = 2) -> Path:
    """Write OUTPUT_DIR/checkpoints/step_N atomically: save into a temporary folder, write
    trainer_state.json (the completion marker) last, and rename it when complete, so a save
    cut short (a crash, a kill past the grace period) never looks like a checkpoint and the
    previous one stays. Rotation keeps the newest `total_limit` complete ones.
    Every process must call this (accelerate saves per-process RNG states)."""
    root = Path(output_dir) / CHECKPOINT_DIR
    final = root / f"step_{step}"
    tmp = root / f".tmp_step_{step}"
    if _last_saved.get("key") == (str(Path(output_dir).resolve()), step) and final.is_dir():
        # A periodic save met an epoch end or the last step: the weights, optimizer and RNG
        # are the ones just written; only the position moves on (epoch + 1, batch 0), so a
        # resume does not replay the epoch's end. Every process takes this branch alike.
        if accelerator.is_main_process:
            part = final / (_STATE_FILE + ".tmp")
            part.write_text(json.dumps({"step": step, **state}, indent=2))
            part.replace(final / _STATE_FILE)
        accelerator.wait_for_everyone()
        return final
    if accelerator.is_main_process:
        for stale in root.glob(".tmp_step_*"):  # left by a save that was cut short
            shutil.rmtree(stale, ignore_errors=True)
        root.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / _STATE_FILE).write_text(json.dumps({"step": step, **state}, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        if total_limit and total_limit > 0:
            for old in list_checkpoints(output_dir)[:-total_limit]:
                shutil.rmtree(old, ignore_errors=True)
        logger.info("saved resume checkpoint %s", final)
    accelerator.wait_for_everyone()
    _last_saved["key"] = (str(Path(output_dir).resolve()), step)
    return final


def list_checkpoints(output_dir) -> list[Path]:
    root = Path(output_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    done = [p for p in root.glob("step_*") if p.name[5:].isdigit() and (p / _STATE_FILE).exists()]
    return sorted(done, key=lambda p: int(p.name.split("_")[1]))


def _incomplete_checkpoints(output_dir) -> list[Path]:
    """step_N folders without their completion marker (copied in part, or written by a tool
    that does not save atomically): never resumed from."""
    root = Path(output_dir) / CHECKPOINT_DIR
    return sorted(p for p in root.glob("step_*") if p.is_dir() and not (p / _STATE_FILE).exists())


def resolve_resume(output_dir, resume_from_checkpoint) -> Path | None:
    """'latest' -> the newest complete checkpoint (None if there is none yet, so a launcher
    can always pass --resume_from_checkpoint latest); a path must exist."""
    if not resume_from_checkpoint:
        return None
    if resume_from_checkpoint == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            logger.info("no checkpoint under %s/%s; starting fresh", output_dir, CHECKPOINT_DIR)
        return found[-1] if found else None
    path = Path(resume_from_checkpoint)
    if not (path / _STATE_FILE).exists():
        raise FileNotFoundError(f"--resume_from_checkpoint {path}: not a complete checkpoint "
                                f"(no {_STATE_FILE}); use 'latest' or one of "
                                f"{[str(p) for p in list_checkpoints(output_dir)]}")
    return path


def load_checkpoint(accelerator: Accelerator, path: Path) -> dict:
    """Restore model/optimizer/scheduler/RNG state; return the trainer state dict
    (step, epoch, batches done in that epoch, ...)."""
    accelerator.load_state(str(path))
    state = json.loads((Path(path) / _STATE_FILE).read_text())
    logger.info("resumed from %s (step %d)", path, state["step"])
    return state


def resume_from(accelerator: Accelerator, output_dir, resume_from_checkpoint) -> dict | None:
    """Load the checkpoint to resume from; return its trainer state, or None to start fresh.
    With 'latest', a damaged newest checkpoint (a missing or truncated file) is passed over,
    with a warning naming it, for the newest one that loads; a path given explicitly must load."""
    _last_saved.clear()  # a new run in this process: its saves are its own
    if resume_from_checkpoint != "latest":
        path = resolve_resume(output_dir, resume_from_checkpoint)
        return load_checkpoint(accelerator, path) if path is not None else None
    candidates = list_checkpoints(output_dir)[::-1]
    for path in _incomplete_checkpoints(output_dir):
        logger.warning("checkpoint folder %s is incomplete (no %s: its save was cut short); ignored", path,
                       _STATE_FILE)
    for path in candidates:
        try:
            return load_checkpoint(accelerator, path)
        except Exception as e:  # a crash mid-save on another filesystem, a disk error, a deleted file
            logger.warning("checkpoint %s is damaged (%s: %s); falling back to the one before it", path,
                           type(e).__name__, str(e).splitlines()[0][:200])
    if candidates:
        raise SystemExit(f"error: none of the {len(candidates)} checkpoints under {Path(output_dir) / CHECKPOINT_DIR} "
                         "loads (see the warnings above); pass --overwrite_output_dir to start over")
    logger.info("no checkpoint under %s/%s; starting fresh", output_dir, CHECKPOINT_DIR)
    return None


def unwrap(accelerator: Accelerator, model):
    return accelerator.unwrap_model(model, keep_torch_compile=False)


def count_parameters(model) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable


# ---------------------------------------------------------------- what a resume checkpoint holds

FROZEN_FINGERPRINT_FILE = "frozen_weights.json"
ACCELERATE_MODEL_FILE = "model.safetensors"  # accelerate's own name for a checkpoint's model file


def weights_fingerprint(tensors: dict, stored_dtypes: dict | None = None) -> dict:
    """A content hash (sha256) of `tensors`: each one's name, shape, dtype and raw bytes.
    Tensors that master_weights widened are hashed in the dtype they were stored in (exact:
    bf16 -> fp32 -> bf16 is lossless), so a resume under another --mixed_precision still
    matches. Tensors are hashed on threads (hashlib and the device copy release the GIL), then
    combined in name order: an 8B tower takes seconds."""
    import hashlib
    from concurrent.futures import ThreadPoolExecutor
    stored = stored_dtypes or {}

    def one(item):
        name, t = item
        t = t.detach()
        if name in stored and t.dtype != stored[name]:
            t = t.to(stored[name])
        h = hashlib.sha256(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        if t.device.type != "meta" and t.numel():
            h.update(t.to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy())
        return h.digest(), t.numel() * t.element_size()

    items = sorted(tensors.items())
    with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:
        hashed = list(pool.map(one, items))
    total = hashlib.sha256()
    for digest, _ in hashed:
        total.update(digest)
    return {"sha256": total.hexdigest(), "tensors": len(items), "bytes": sum(n for _, n in hashed)}


class TrainableOnlyCheckpoints:
    """Resume checkpoints that hold the trained tensors, not the whole model, for every stage.

    accelerate's save_state writes the whole model into every checkpoint: a frozen 8B text
    tower (16 GB) per checkpoint fills the disk and cannot be written within a preemption's
    grace period, although it never changes and the run reloads it from where it came from at
    every start. Here a checkpoint holds the trained tensors (`filename`), next to accelerate's
    optimizer, scheduler and RNG states, and a fingerprint of the frozen ones taken once at
    startup (FROZEN_FINGERPRINT_FILE): a resume onto other frozen weights is refused in one line
    instead of silently pairing trained tensors with a model they were not trained with.

    `module` is the plain model (not a DDP wrapper). Its tensors are recorded here, so a wrapper
    later put around any part (Stage1's projector) changes nothing. `keeps(name, parameter)`
    chooses the trained parameters (default: those that require grad now: LoRA adapters only,
    for a LoRA run); Stage2 also keeps the vision tower that trains in epoch 1 only. A buffer is
    state of the nearest module that holds parameters (BatchNorm statistics belong to its
    affine weights): trained when that module trains (Merlin's BatchNorm in phase 2), frozen
    and fingerprinted when not (phase 1's frozen backbone, kept in eval mode).

    A checkpoint without the fingerprint file was written whole by accelerate (by this code
    before trained-only checkpoints): accelerate loads it as before. Under DeepSpeed the engine
    writes its own checkpoint and nothing is registered."""

    def __init__(self, accelerator: Accelerator, module: torch.nn.Module, keeps=None,
                 filename: str = ACCELERATE_MODEL_FILE, stored_dtypes: dict | None = None):
        from accelerate.utils import DistributedType
        self.acc, self.filename = accelerator, filename
        keeps = keeps or (lambda name, p: p.requires_grad)
        params = dict(module.named_parameters())
        self._params = {n: p for n, p in params.items() if keeps(n, p)}
        frozen = {n: p for n, p in params.items() if n not in self._params}
        self._buffers: dict[str, tuple[torch.nn.Module, str]] = {}  # looked up at save: .to() replaces buffers
        modules = dict(module.named_modules())
        for mod_name, m in modules.items():
            for b, t in m._buffers.items():
                if t is None or b in m._non_persistent_buffers_set:
                    continue
                name = f"{mod_name}.{b}" if mod_name else b
                if self._owner_trains(mod_name, modules):
                    self._buffers[name] = (m, b)
                else:
                    frozen[name] = t
        self.fingerprint = None
        if accelerator.distributed_type != DistributedType.DEEPSPEED:
            t0 = time.time()
            self.fingerprint = weights_fingerprint(frozen, stored_dtypes)
            logger.info("resume checkpoints hold %d trained tensors; the %d frozen ones (%.2f GB) are "
                        "fingerprinted instead (%.1fs)", len(self.names), self.fingerprint["tensors"],
                        self.fingerprint["bytes"] / 1e9, time.time() - t0)
            accelerator.register_save_state_pre_hook(self._save)
            accelerator.register_load_state_pre_hook(self._load)

    def _owner_trains(self, mod_name: str, modules: dict) -> bool:
        owner = mod_name
        while owner and next(modules[owner].parameters(), None) is None:
            owner = owner.rpartition(".")[0]
        prefix = f"{owner}." if owner else ""
        return any(n.startswith(prefix) for n in self._params)

    @property
    def names(self) -> list[str]:
        return sorted([*self._params, *self._buffers])

    def trains(self, prefix: str) -> bool:
        """Whether any tensor under `prefix` is trained state (else that part never changes)."""
        return any(n.startswith(prefix) for n in self.names)

    def state(self) -> dict[str, torch.Tensor]:
        out = dict(self._params)
        out.update({n: m._buffers[b] for n, (m, b) in self._buffers.items()})
        return out

    def _save(self, models, weights, output_dir):
        weights.clear()  # accelerate writes no whole-model file
        if not self.acc.is_main_process:
            return
        from safetensors.torch import save_file
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        save_file({n: t.detach().to("cpu").contiguous() for n, t in self.state().items()}, str(out / self.filename))
        (out / FROZEN_FINGERPRINT_FILE).write_text(json.dumps(self.fingerprint, indent=2))

    def _load(self, models, input_dir):
        folder = Path(input_dir)
        path, record = folder / self.filename, folder / FROZEN_FINGERPRINT_FILE
        if not record.is_file():
            if self.filename == ACCELERATE_MODEL_FILE or not path.is_file():
                return  # written whole by accelerate: it loads it
            logger.warning("%s has no %s (written before frozen weights were fingerprinted): the frozen "
                           "weights are not checked", folder, FROZEN_FINGERPRINT_FILE)
        else:
            saved = json.loads(record.read_text()).get("sha256")
            if saved != self.fingerprint["sha256"]:
                message = (f"error: checkpoint {folder} was trained on other frozen weights than this run loaded "
                           f"(fingerprint {str(saved)[:16]} there, {self.fingerprint['sha256'][:16]} here; or the "
                           "same ones stored in another dtype): its trained tensors belong to that model. Resume "
                           "with the towers/checkpoints that run started from, or start over with "
                           "--overwrite_output_dir.")
                raise SystemExit(message if self.acc.is_main_process else 1)
        from safetensors.torch import load_file
        held = load_file(str(path))  # a missing file raises: `latest` then takes the checkpoint before
        mine = self.state()
        unexpected, missing = sorted(set(held) - set(mine)), sorted(set(mine) - set(held))
        if unexpected:
            raise ValueError(f"{path}: holds weights this run does not train ({unexpected[:3]}...); it was "
                             "written by a run with another model or LoRA setup")
        if missing:
            raise ValueError(f"{path}: lacks trained weights {missing[:3]}...; it was written by a run that "
                             "trained other parts (--unfreeze_*/--lora_r/--train_ve_first_epoch/--freeze_* differ)")
        with torch.no_grad():
            for n, t in mine.items():
                t.copy_(held[n])
        models.clear()  # loaded here; accelerate looks for no whole-model file


# ---------------------------------------------------------------- exports: one copy of what did not change

def same_bytes(a, b, chunk: int = 1 << 20) -> bool:
    """Two files with the same bytes (stops at the first block that differs: a trained tower
    differs within its first megabyte)."""
    a, b = Path(a), Path(b)
    if a.stat().st_size != b.stat().st_size:
        return False
    with a.open("rb") as fa, b.open("rb") as fb:
        while True:
            x, y = fa.read(chunk), fb.read(chunk)
            if x != y:
                return False
            if not x:
                return True


def link_or_copy_unchanged(path, first, *, copy: bool = True) -> bool:
    """Make `path` the file `first` is: a hard link to it (one copy on disk; each folder still
    holds a whole file and loads on its own), or, where the file system refuses links (another
    device, no link support), a copy (`copy=False`: leave `path` as it is). True when linked."""
    path, first = Path(path), Path(first)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.link-tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(first, tmp)
        linked = True
    except OSError:
        if not copy:
            return False
        shutil.copy2(first, tmp)
        linked = False
    os.replace(tmp, path)
    return linked


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.endswith(".link-tmp"))


class ExportCopies:
    """One copy on disk of each export file that an earlier export of the run already holds.

    A frozen tower is the same in every epoch_N/, best_model/ and final_model/; written into
    each, a 16 GB text tower costs 16 GB per epoch. Each folder stays self-contained: a hard
    link is a whole file, and deleting one folder leaves the others intact.

    - before_write(out): a folder written again (best_model/) first drops the files it shares
      with other folders, so the new write cannot go through a link into their copy.
    - link_parts(out, parts): parts (a subfolder or file) that cannot have changed (a frozen
      tower) are linked from a copy this process wrote, and not written at all.
    - after_write(out, parts): every written file byte-identical to the first copy of the same
      relative path (in this process's exports, or in the run's exports already on disk after a
      resume) becomes a link to it; `parts` are recorded as complete in `out`."""

    PATTERNS = ("epoch_*", "best_model", "final_model")

    def __init__(self, output_dir):
        self.root = Path(output_dir)
        self.first: dict[str, Path] = {}
        self.written: dict[str, list[Path]] = {}

    def before_write(self, out) -> None:
        out = Path(out)
        if out.is_dir():
            for f in _files(out):
                if f.stat().st_nlink > 1:
                    f.unlink()

    def link_parts(self, out, parts) -> set[str]:
        out, linked = Path(out), set()
        for part in parts:
            sources = [f / part for f in self.written.get(part, []) if f != out and (f / part).exists()]
            if not sources:
                continue
            src, dst = sources[0], out / part
            if dst.is_dir():
                shutil.rmtree(dst)
            if src.is_file():
                link_or_copy_unchanged(dst, src)
            else:
                for f in _files(src):
                    link_or_copy_unchanged(dst / f.relative_to(src), f)
            linked.add(part)
        return linked

    def _on_disk(self, out: Path, rel: Path) -> Path | None:
        """The oldest export of the run already on disk (a resumed run's) holding `rel`."""
        def order(p):
            return (0, int(p.name[6:])) if p.name[6:].isdigit() else (1, p.name)
        folders = sorted((p for pat in self.PATTERNS for p in self.root.glob(pat) if p.is_dir() and p != out),
                         key=order)
        return next((f / rel for f in folders if (f / rel).is_file()), None)

    def after_write(self, out, parts=()) -> None:
        out = Path(out)
        for f in _files(out):
            rel = f.relative_to(out)
            key = str(rel)
            first = self.first.get(key)
            if first is None or not first.is_file():
                first = self._on_disk(out, rel)
            if first is None or first == f:
                self.first[key] = f
                continue
            if os.path.samefile(first, f) or (same_bytes(first, f) and link_or_copy_unchanged(f, first, copy=False)):
                self.first[key] = first
            elif key not in self.first or not self.first[key].is_file():
                self.first[key] = f
        for part in parts:
            if (out / part).exists():
                self.written.setdefault(part, []).append(out)


# ---------------------------------------------------------------- loop helpers

def epoch_batches(accelerator: Accelerator, dataloader, epoch: int, skip_batches: int = 0):
    """The dataloader for one epoch, in the order a fresh run would see it; on resume the
    first `skip_batches` are skipped without loading them twice."""
    if hasattr(dataloader, "set_epoch"):
        dataloader.set_epoch(epoch)
    return _RngNeutral(accelerator.skip_first_batches(dataloader, skip_batches) if skip_batches else dataloader)


class _RngNeutral:
    """Iterates an epoch's loader without touching the global torch RNG. A DataLoader draws
    its workers' base seed from the global RNG when its iterator is made, and when that
    happens depends on the run's history, not on the step: a resumed run makes one mid-epoch
    just after the checkpoint's RNG state was restored, and with persistent workers an
    uninterrupted run makes one in its first epoch only, while a run resumed at a later epoch
    makes its first there. Any such draw shifts every dropout mask (LoRA dropout) after it, so
    no epoch's iterator may draw at all."""

    def __init__(self, loader):
        self.loader = loader

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        state = torch.get_rng_state()
        it = iter(self.loader)
        first = next(it, _RngNeutral)  # accelerate's loaders make the DataLoader iterator lazily
        torch.set_rng_state(state)
        if first is not _RngNeutral:
            yield first
            yield from it


class EvalShard:
    """This process's share of a validation loader, for metrics every process computes and then
    reduces: process r takes batches r, r + P, r + 2P, ... of the file-order batches, with no
    sample padded in or repeated (accelerate's even batches would count some twice). Batches
    come moved to the device. Every process must evaluate: rank 0 alone, while the others wait
    at a collective, trips the NCCL watchdog on a large val set."""

    def __init__(self, accelerator: Accelerator, loader):
        from torch.utils.data import DataLoader
        self.device = accelerator.device
        n, bs = len(loader.dataset), loader.batch_size
        batches = [list(range(s, min(s + bs, n))) for s in range(0, n, bs)]
        self.loader = DataLoader(loader.dataset, batch_sampler=batches[accelerator.process_index::accelerator.num_processes],
                                 collate_fn=loader.collate_fn, num_workers=loader.num_workers,
                                 pin_memory=loader.pin_memory)

    def __iter__(self):
        from accelerate.utils import send_to_device
        for batch in self.loader:
            yield send_to_device(batch, self.device)

    def __len__(self):
        return len(self.loader)


class LengthGroupedSampler(torch.utils.data.Sampler):
    """Shuffled order in which each batch holds samples of similar length (less padding): a
    permutation by (seed, epoch) is cut into mega-batches of `group` batches, each sorted by
    length, cut into batches, and the batches are shuffled. Every sample once per epoch, the
    same order for the same seed and epoch (so a resumed run sees the same batches);
    `set_epoch` is called by the loop through accelerate."""

    def __init__(self, lengths, batch_size: int, seed: int = 0, group: int = 50):
        self.lengths, self.batch_size, self.seed, self.group = list(lengths), batch_size, seed, group
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self):
        return len(self.lengths)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        perm = torch.randperm(len(self.lengths), generator=g).tolist()
        mega = self.batch_size * self.group
        ordered = []
        for s in range(0, len(perm), mega):
            ordered += sorted(perm[s:s + mega], key=lambda i: -self.lengths[i])
        # Mega-batches are whole batches, so only the last one can be short; it goes last, or
        # the DataLoader's cuts would fall mid-group for every batch after it.
        tail = len(ordered) % self.batch_size
        full = [ordered[s:s + self.batch_size] for s in range(0, len(ordered) - tail, self.batch_size)]
        for b in torch.randperm(len(full), generator=g).tolist():
            yield from full[b]
        yield from ordered[len(ordered) - tail:]


def accumulation_windows(batches, k: int):
    """Group micro-batches into optimizer steps of k (the last may be shorter)."""
    window = []
    for b in batches:
        window.append(b)
        if len(window) == k:
            yield window
            window = []
    if window:
        yield window


class NonFiniteGuard:
    """Counts optimizer steps skipped for a NaN/inf loss or gradient norm: `bad` in a row and
    `total` in all; `exhausted` after `patience` in a row (the run has diverged, or a run of bad
    rows), when going on would only spend the allocation."""

    def __init__(self, patience: int = 10):
        self.patience, self.bad, self.total = max(int(patience), 1), 0, 0

    def update(self, finite: bool) -> None:
        self.bad = 0 if finite else self.bad + 1
        self.total += int(not finite)

    @property
    def exhausted(self) -> bool:
        return self.bad >= self.patience


def _stop_with_one_process_launcher() -> None:
    """accelerate's one-process launcher neither relays signals nor stops its child, so a
    SIGTERM to it alone (the job's main pid) would leave the trainer orphaned, training on.
    Under it, Linux is asked to send the trainer SIGTERM when the launcher dies: the handler
    then checkpoints and exits 0 like any preemption. (torchrun's agent, used for several
    processes, relays signals itself.)"""
    if not sys.platform.startswith("linux") or "TORCHELASTIC_RUN_ID" in os.environ:
        return
    parent = os.getppid()
    try:
        cmdline = Path(f"/proc/{parent}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return
    if not (any(a.endswith(b"accelerate") for a in cmdline[:2]) and b"launch" in cmdline):
        return
    import ctypes
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM))
    if os.getppid() != parent:  # it died before the request was in place
        os.kill(os.getpid(), signal.SIGTERM)


class Preemption:
    """SIGTERM and SIGUSR1, which SLURM, Kubernetes and spot instances send some time before
    they kill a job, only set a flag here; the loop then finishes its optimizer step, writes a
    resume checkpoint and exits 0 (OptimizerStep.stop_if_requested). The flag is all-reduced
    once per step (OptimizerStep.finish), so every process stops after the same step even when
    the signal reached only one of them, or each at another moment. A second signal changes
    nothing: torchrun relays the SIGTERM it got to workers that may have had theirs already.

    Hand-written: accelerate and torch have no such hook (torchrun's agent only relays the
    signal, then kills its workers after TORCH_ELASTIC_SHUTDOWN_TIMEOUT, 30 s by default)."""

    SIGNALS = ("SIGTERM", "SIGUSR1")
    _installed = None  # the process's active instance; a new run's replaces one left behind

    def __init__(self):
        self.received: int | None = None  # the first signal's number
        self._previous: dict = {}

    def install(self) -> "Preemption":
        import threading
        if threading.current_thread() is not threading.main_thread():
            return self  # Python runs signal handlers in the main thread only
        if Preemption._installed is not None:
            Preemption._installed.restore()
        for name in self.SIGNALS:
            sig = getattr(signal, name, None)  # Windows has no SIGUSR1
            if sig is not None:
                self._previous[sig] = signal.signal(sig, self._handle)
        Preemption._installed = self
        _stop_with_one_process_launcher()
        return self

    def _handle(self, signum, frame) -> None:
        self.received = self.received or int(signum)

    def restore(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, signal.SIG_DFL if previous is None else previous)
        self._previous.clear()
        if Preemption._installed is self:
            Preemption._installed = None


class OptimizerStep:
    """One optimizer step over a window of micro-batches, the same for every trainer and engine.

    Every trainer computes its own exactly-normalised loss per micro-batch (the sum over the
    window is the step's loss) and calls `backward`; `finish` then clips, agrees with the other
    processes whether the step is finite and whether to stop, steps or skips, updates the fp16
    scaler and zeroes the gradients; `stop_if_requested` ends the run with a resume checkpoint
    when they agreed to stop. Engines differ in who does what, and this class is the one place
    that knows:

    - DDP / one process: gradients sync on the window's last micro-batch only (`no_sync`
      before it). One all-reduce per step carries two flags: "my loss, or the grad norm, is
      NaN/inf" and "I received SIGTERM/SIGUSR1", so no process steps while another skips and
      all stop after the same step.
    - fp16 (a GradScaler): an overflowed step must still go through `optimizer.step()`, which
      lets the scaler skip it and lower its scale; skipping the call instead leaves the
      scaler's per-step state behind and the next unscale raises. A step skipped for another
      process's loss while the gradients are finite ends the scaler's step with `update()`.
    - DeepSpeed: the engine steps inside `backward` on the boundary micro-batch, clipping with
      its configured `gradient_clipping` (set from --max_grad_norm) and skipping overflowed
      fp16 steps itself; `optimizer.step()`/`zero_grad()` are no-ops and the norm is read back.
      A NaN loss with finite gradients cannot be skipped there; it is still counted.
    - FSDP2: parameters are DTensors; accelerate's clip reduces the norm over shards.

    The accelerator is built with the run's accumulation count, so accelerate (or the DeepSpeed
    engine) divides each micro-batch loss by it; `backward` multiplies it back, which keeps the
    trainers' own normalisation exact for short last windows too.

    `dataset` (the training set; its `rows` and `source`/`json_path`) lets the first skipped
    step of a streak name its samples' rows in the data file.
    """

    def __init__(self, accelerator: Accelerator, optimizer, model, params, max_grad_norm: float,
                 patience: int = 10, dataset=None):
        self.acc, self.optimizer, self.model = accelerator, optimizer, model
        self.params = list(params)
        self.max_norm = max_grad_norm if max_grad_norm and max_grad_norm > 0 else float("inf")
        self.guard = NonFiniteGuard(patience)
        self.dataset = dataset
        self.preemption = Preemption()
        self.stop: str | None = None  # set when the processes agreed to stop: the signal's name
        self.steps_taken = 0  # optimizer updates actually applied (skipped ones excluded)
        from accelerate.utils import DistributedType
        self.deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
        self.norm0 = self.weight_norm()
        self.runaway_weights: dict | None = None

    def set_params(self, params) -> None:
        self.params = list(params)
        self.norm0 = self.weight_norm()

    @torch.no_grad()
    def weight_norm(self) -> float:
        norms = [torch.linalg.vector_norm(p.detach().float()) for p in self.params if p.numel()]
        return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0

    # Trained weights whose norm grows this much have run away: a fine-tune changes it by a few
    # percent, lr 1e3 multiplied Stage1's projector weights by 4e4. The loss alone misses it
    # when the LM ignores its inputs (it stayed at log(V) while the projector blew up).
    WEIGHT_RUNAWAY = 100.0
    WEIGHT_CHECK_EVERY = 10

    def _check_weights(self, step: int) -> None:
        if self.runaway_weights is not None or self.norm0 <= 0 or self.steps_taken % self.WEIGHT_CHECK_EVERY:
            return
        norm = self.weight_norm()
        if not math.isfinite(norm) or norm > self.WEIGHT_RUNAWAY * self.norm0:
            self.runaway_weights = {"step": step, "norm": norm, "norm0": self.norm0}

    def catch_preemption(self) -> None:
        """From now on SIGTERM/SIGUSR1 stop the run after the current step (see Preemption)."""
        self.preemption.install()

    def close(self) -> None:
        """The signals' previous handlers back (at the end of the loop)."""
        self.preemption.restore()

    def micro_batches(self, window):
        """Yield the window's micro-batches, each inside the right gradient-sync context."""
        import contextlib
        for i, batch in enumerate(window):
            last = i == len(window) - 1
            self.acc.gradient_state._set_sync_gradients(last)
            ctx = contextlib.nullcontext() if last else self.acc.no_sync(self.model)
            with ctx:
                yield batch
        self.acc.gradient_state._set_sync_gradients(True)

    def backward(self, loss: torch.Tensor) -> None:
        self.acc.backward(loss * self.acc.gradient_accumulation_steps)

    def _agree(self, nonfinite: bool, signum: int) -> tuple[bool, int]:
        """Any process's non-finite flag and stop signal, on every process: the step's one
        collective (the stop flag is the signal's number, so every process can name it)."""
        if getattr(self.acc, "num_processes", 1) == 1:
            return nonfinite, signum
        flags = torch.tensor([float(nonfinite), float(signum)], device=self.acc.device)
        flags = self.acc.reduce(flags, "max").tolist()
        return flags[0] > 0, int(flags[1])

    def finish(self, step: int, loss=None, window=None):
        """Clip; agree whether the step is non-finite (this process's `loss`, the window's
        summed loss, or the grad norm) and whether to stop; step or skip, update the scaler,
        zero the gradients. `step` counts the steps before this one. Returns (grad_norm, applied)."""
        acc = self.acc
        grad_norm = acc.clip_grad_norm_(self.params, self.max_norm)  # under DeepSpeed: already stepped
        grad_norm = float("nan") if grad_norm is None else float(grad_norm)
        bad_loss = loss is not None and not bool(torch.isfinite(torch.as_tensor(loss).detach()).all())
        nonfinite, signum = self._agree(bad_loss or not math.isfinite(grad_norm), self.preemption.received or 0)
        if self.deepspeed:
            applied = math.isfinite(grad_norm)
        else:
            if not nonfinite:
                self.optimizer.step()
            elif acc.scaler is not None:
                if math.isfinite(grad_norm):
                    acc.scaler.update()  # unscale_ ran in the clip; the scaler needs its step closed
                else:
                    self.optimizer.step()  # the scaler's step: it skips the inf step and lowers its scale
            applied = not nonfinite and not acc.optimizer_step_was_skipped
            self.optimizer.zero_grad(set_to_none=True)
        self.steps_taken += int(applied)
        if applied:
            self._check_weights(step + 1)
        self.guard.update(not nonfinite)
        if nonfinite:
            self._report_nonfinite(step + 1, grad_norm, bad_loss, window)
        if signum and self.stop is None:
            self.stop = signal.Signals(signum).name
        return grad_norm, applied

    def _report_nonfinite(self, step: int, grad_norm: float, bad_loss: bool, window) -> None:
        """A warning per skipped step, `train/nonfinite_skipped` in the metrics, and with the
        first of a streak the step's samples: every process's rows, so the bad one can be found."""
        if self.deepspeed:
            how = ("the engine skipped the update" if not math.isfinite(grad_norm)
                   else "DeepSpeed had already applied it (its engine steps inside backward)")
        elif self.acc.scaler is not None and not math.isfinite(grad_norm):
            how = "the fp16 scaler skips the update and lowers its scale"
        else:
            how = "skipping the update on every process"
        samples = self._samples(window, bad_loss) if self.guard.bad == 1 else ""
        logger.warning("step %d: non-finite loss or gradient norm (grad norm %.4g); %s (%d in a row, %d in all, "
                       "--max_nonfinite_steps %d)%s", step, grad_norm, how, self.guard.bad, self.guard.total,
                       self.guard.patience, samples)
        if getattr(self.acc, "project_dir", None) is not None:  # the trainers' Accelerator has one
            log_metrics(self.acc, {"train/nonfinite_skipped": self.guard.total}, step)

    def _samples(self, window, bad_loss: bool) -> str:
        ids = []
        for b in window or []:
            if isinstance(b, dict) and "index" in b:
                ids += [int(i) for i in torch.as_tensor(b["index"]).reshape(-1).tolist()]
        mine = [(getattr(self.acc, "process_index", 0), bool(bad_loss), ids)]
        if getattr(self.acc, "num_processes", 1) > 1:  # every process is here: the skip was agreed
            from accelerate.utils import gather_object
            mine = gather_object(mine)
        rows = getattr(self.dataset, "rows", None)
        source = getattr(self.dataset, "source", None) or getattr(self.dataset, "json_path", None)

        def row(i):
            r = rows[i].get("row", i) if rows is not None and 0 <= i < len(rows) else i
            return f"row {r}" if isinstance(r, int) else str(r)
        def listed(ids):
            return ", ".join(row(i) for i in ids[:32]) + (", ..." if len(ids) > 32 else "") if ids else "no sample ids"
        parts = [f"process {rank}{' (its loss is NaN/inf)' if bad else ''}: {listed(ids)}" for rank, bad, ids in mine]
        return f"; its samples{f' in {source}' if source else ''}: " + "; ".join(parts)

    def stop_if_requested(self, step: int, state: dict, args, watch: "DivergenceWatch | None" = None) -> None:
        """Call after the step's bookkeeping and periodic checkpoint, with the state a resume
        needs (epoch, batches done). When the processes agreed to stop (a preemption signal,
        --max_nonfinite_steps skipped steps in a row, or a loss that ran away by the logger's
        `watch`): write a resume checkpoint, unless this step's was just written, say why in one
        line, and exit: status 0 after a signal (the same command with --resume_from_checkpoint
        latest continues exactly), 1 otherwise."""
        runaway = watch.runaway if watch is not None else None
        if self.stop is None and not self.guard.exhausted and runaway is None and self.runaway_weights is None:
            return
        every = getattr(args, "checkpointing_steps", 0)
        if every and step % every == 0:  # the trainer has just saved it
            path = Path(args.output_dir) / CHECKPOINT_DIR / f"step_{step}"
        else:
            path = save_checkpoint(self.acc, args.output_dir, step, state, args.checkpoints_total_limit)
        self.close()
        # The checkpoint holds the weights the bad steps left; a lower learning rate is a new
        # run (learning_rate is run-defining), so the advice is a command that starts one.
        restart = ("start again with a lower --learning_rate (or a longer warmup) and --overwrite_output_dir, "
                   "which moves this run aside")
        if self.guard.exhausted:
            message = (f"error: {self.guard.bad} optimizer steps in a row (steps {step - self.guard.bad + 1}-{step}) "
                       f"had a NaN/inf loss or gradient norm and were skipped; stopped with a checkpoint in "
                       f"{path}. Likely causes: a learning rate too high ({restart}), fp16 overflow "
                       f"(use --mixed_precision bf16), or a bad data row (the first skipped step's samples are "
                       f"logged above).")
            self.acc.end_training()
            raise SystemExit(message if self.acc.is_main_process else 1)
        if self.runaway_weights is not None and self.stop is None:
            w = self.runaway_weights
            message = (f"error: the trained weights ran away: their norm grew from {w['norm0']:.4g} to {w['norm']:.4g} "
                       f"by step {w['step']} (over {self.WEIGHT_RUNAWAY:g}x); stopped with a checkpoint in {path}. "
                       f"The learning rate is likely too high: {restart}.")
            self.acc.end_training()
            raise SystemExit(message if self.acc.is_main_process else 1)
        if runaway is not None and self.stop is None:
            message = (f"error: the loss ran away: {runaway['loss']:.4g} at step {runaway['step']}, over "
                       f"{watch.stop_factor:g}x its level earlier in the run ({runaway['baseline']:.4g}) for "
                       f"{runaway['logged']} logged steps in a row; stopped with a checkpoint in {path}. The learning "
                       f"rate is likely too high: {restart}.")
            self.acc.end_training()
            raise SystemExit(message if self.acc.is_main_process else 1)
        logger.warning("%s received: stopped after step %d with a resume checkpoint in %s; the same command with "
                       "--resume_from_checkpoint latest continues the run exactly", self.stop, step, path)
        self.acc.end_training()
        raise SystemExit(0)


class DivergenceWatch:
    """A loss that stays finite but runs away, in two tiers:

    - warn: more than `factor` x the median of the last `window` logged losses for `patience`
      logged steps in a row gets one warning (until the loss comes back down), naming the step,
      the loss and the median; quiet until `min_history` losses are logged (a normal run's loss
      falls fast and noisily at the start);
    - stop: more than `stop_factor` x the baseline for `patience` logged steps in a row sets
      `runaway`, and the loop stops with a checkpoint (OptimizerStep.stop_if_requested). The
      baseline is the lowest median of 5 consecutive logged losses so far, so it is taken before
      the loss runs away (at lr 1e3 Stage2's loss went from 6.6 to 1.9e7 within the first 20
      logged steps, which the warning's median by then included) and one lucky low batch late
      in a run does not make normal noise look like a runaway.

    Every process sees the same logged loss (the mean over processes), so all decide alike."""

    def __init__(self, factor: float = 10.0, window: int = 50, patience: int = 3, min_history: int = 20,
                 stop_factor: float = 10.0):
        from collections import deque
        self.factor, self.patience, self.min_history, self.stop_factor = factor, patience, min_history, stop_factor
        self.history = deque(maxlen=window)
        self.recent = deque(maxlen=5)
        self.high, self.warned = 0, False
        self.baseline, self.above = math.inf, 0
        self.runaway: dict | None = None

    def update(self, step: int, loss: float) -> bool:
        """Record a logged loss; True when this one raised the warning."""
        if not math.isfinite(loss):
            return False  # skipped steps are the non-finite guard's business
        self.recent.append(loss)
        self.baseline = min(self.baseline, statistics.median(self.recent))
        self.above = self.above + 1 if loss > self.stop_factor * self.baseline else 0
        if self.above >= self.patience and self.runaway is None:
            self.runaway = {"step": step, "loss": loss, "baseline": self.baseline, "logged": self.above}
        fired = False
        if len(self.history) >= self.min_history:
            median = statistics.median(self.history)
            if median > 0 and loss > self.factor * median:
                self.high += 1
                if self.high >= self.patience and not self.warned:
                    logger.warning("step %d: loss %.4g is over %gx its median %.4g over the last %d logged steps, "
                                   "for %d logged steps in a row: training may be diverging; try a lower "
                                   "--learning_rate (or a longer warmup)", step, loss, self.factor, median,
                                   len(self.history), self.high)
                    self.warned = fired = True
            else:
                self.high, self.warned = 0, False
        self.history.append(loss)
        return fired


class StepLogger:
    """Progress bar, loss (mean over processes), lr, grad norm and samples/s every `every`
    optimizer steps and at the last one: the logging every trainer's loop shares. The logged
    losses also feed a DivergenceWatch."""

    def __init__(self, accelerator: Accelerator, scheduler, every: int, total_steps: int, initial: int, desc: str):
        from tqdm.auto import tqdm
        self.acc, self.scheduler, self.every, self.total = accelerator, scheduler, max(every, 1), total_steps
        self.bar = tqdm(total=total_steps, initial=initial, desc=desc, disable=not accelerator.is_local_main_process)
        self.tick, self.samples = time.perf_counter(), 0
        self.divergence = DivergenceWatch()
        self.compiled = CompileWatch(_compiled_blocks > 0)
        self.steps_here = 0

    def step(self, step: int, epoch: int, loss, grad_norm, samples: int) -> None:
        self.samples += samples * self.acc.num_processes
        self.bar.update(1)
        self.steps_here += 1
        self.compiled.step(self.steps_here)
        if step % self.every and step != self.total:
            return
        loss = self.acc.reduce(torch.as_tensor(loss, device=self.acc.device, dtype=torch.float32).reshape(1),
                               "mean").item()
        now = time.perf_counter()
        rate, self.tick, self.samples = self.samples / max(now - self.tick, 1e-9), now, 0
        lr = self.scheduler.get_last_lr()[0]
        metrics = {"train/loss": loss, "train/lr": lr, "train/grad_norm": float(grad_norm),
                   "train/samples_per_s": rate, "epoch": epoch}
        if self.acc.device.type == "cuda":
            metrics["train/peak_mem_gib"] = torch.cuda.max_memory_allocated(self.acc.device) / 2**30
        log_metrics(self.acc, metrics, step)
        self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
        logger.info("Step %d: Loss = %.4f, LR = %.2e", step, loss, lr)  # the seeds' log line
        self.divergence.update(step, loss)

    def close(self):
        self.bar.close()


def ignore_stop_signals(_worker_id: int = 0) -> None:
    """A DataLoader worker's init: SIGTERM, SIGINT and SIGUSR1 are the trainer's to act on.
    SLURM and the launchers signal the whole process group; a worker that died of it first
    made torch's child-death handler raise `DataLoader worker ... killed by signal` in the
    trainer mid-step, so no preemption checkpoint was written and the run was lost. Ignoring
    them, the workers keep serving batches until the trainer has checkpointed and exits (they
    then stop with it: torch's workers watch their parent)."""
    for name in ("SIGTERM", "SIGINT", "SIGUSR1"):
        sig = getattr(signal, name, None)
        if sig is not None:
            signal.signal(sig, signal.SIG_IGN)


def _shut_down_workers_at_exit() -> None:
    """Stop every live DataLoader's workers through their queues while Python can still do it.
    Workers that ignore SIGTERM outlive multiprocessing's exit hook (it terminates daemonic
    children with SIGTERM, then joins them: a hang), and torch's own shutdown is a no-op once
    the interpreter exits. atexit runs this before both, as it is registered after them.
    Found through gc: accelerate creates the iterators, so nothing else holds them for us."""
    import gc

    from torch.utils.data.dataloader import _MultiProcessingDataLoaderIter
    for obj in gc.get_objects():
        if isinstance(obj, _MultiProcessingDataLoaderIter):
            obj._shutdown_workers()


_WORKER_EXIT_HOOK = []


def loader_kwargs(num_workers: int) -> dict:
    """DataLoader settings every stage shares: page-locked batches when CUDA is used (the
    host-to-device copy can then run asynchronously), workers kept alive across epochs (no
    re-fork and re-import of the dataset per epoch) that leave stop signals to the trainer."""
    if num_workers > 0 and not _WORKER_EXIT_HOOK:
        import atexit
        from torch.utils.data import dataloader  # noqa: F401  (its exit hook must be registered before ours)
        atexit.register(_shut_down_workers_at_exit)
        _WORKER_EXIT_HOOK.append(True)
    return {"num_workers": num_workers, "pin_memory": torch.cuda.is_available(),
            "persistent_workers": num_workers > 0,
            "worker_init_fn": ignore_stop_signals if num_workers > 0 else None}
