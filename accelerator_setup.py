"""Accelerator, logging and checkpoint plumbing shared by every stage.

One place decides: mixed precision, gradient accumulation, seeding, which tracker logs
(wandb / tensorboard / none), and how resume checkpoints are written, rotated and found.
Only the main process prints, logs and writes files.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys
import time
import warnings
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed

logger = logging.getLogger("siglip_med")

CHECKPOINT_DIR = "checkpoints"
_STATE_FILE = "trainer_state.json"


def add_common_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Flags every stage shares; each stage adds its own model/data flags."""
    g = p.add_argument_group("run")
    g.add_argument("--output_dir", "--save_dir", dest="output_dir", required=True)
    g.add_argument("--seed", type=int, default=42)
    g.add_argument("--mixed_precision", choices=["no", "fp16", "bf16", "auto"], default="no", nargs="?",
                   const="auto", help="autocast precision; given alone: bf16 where supported, else fp16")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1)
    g.add_argument("--num_workers", type=int, default=2, help="DataLoader workers")
    g.add_argument("--max_grad_norm", type=float, default=1.0, help="<=0 disables clipping")
    g.add_argument("--warmup_ratio", type=float, default=0.05)
    g.add_argument("--warmup_steps", type=int, default=None, help="overrides --warmup_ratio")
    g.add_argument("--lr_scheduler", choices=["cosine", "linear", "constant", "one_cycle"], default="cosine",
                   help="after the warmup; one_cycle: torch's OneCycleLR (cosine up over the warmup, then down)")
    g.add_argument("--max_steps", type=int, default=None,
                   help="stop after this many optimizer steps (default: all epochs)")
    g.add_argument("--group_by_length", action="store_true",
                   help="Stage1/Stage2: batch samples of similar token length together (less padding)")
    g = p.add_argument_group("logging and checkpoints")
    g.add_argument("--report_to", choices=["wandb", "tensorboard", "none"], default="wandb",
                   help="falls back to tensorboard, then none, if the tracker cannot start")
    g.add_argument("--wandb_project", "--project_name", dest="wandb_project", default="siglip-med")
    g.add_argument("--run_name", "--experiment_name", dest="run_name", default=None)
    g.add_argument("--logging_steps", "--log_interval", dest="logging_steps", type=int, default=10)
    g.add_argument("--checkpointing_steps", "--save_interval", dest="checkpointing_steps", type=int, default=0,
                   help="save resumable state every N optimizer steps (0: only at epoch ends)")
    g.add_argument("--checkpoints_total_limit", type=int, default=2,
                   help="keep the newest N resume checkpoints")
    g.add_argument("--resume_from_checkpoint", default=None,
                   help="'latest' or a path to OUTPUT_DIR/checkpoints/step_N")
    g.add_argument("--overwrite_output_dir", action="store_true",
                   help="start over in an output folder that holds another run (its checkpoints are deleted)")
    return p


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
    ds = accelerator.state.deepspeed_plugin
    if ds is not None:
        # --max_grad_norm is the one source of truth; DeepSpeed clips inside its engine step.
        ds.deepspeed_config["gradient_clipping"] = float(max(args.max_grad_norm, 0.0))
    set_seed(args.seed, device_specific=False)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stderr, level=logging.INFO if accelerator.is_main_process
                        else logging.ERROR, force=True)
    check_output_dir(args)  # before args.json is rewritten, on every process alike
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        if args.overwrite_output_dir:
            shutil.rmtree(out / CHECKPOINT_DIR, ignore_errors=True)
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
                 "lr_scheduler", "seed", "lora_r", "freeze_text_encoder",
                 "freeze_image_backbone", "unfreeze_llm", "unfreeze_projection_layer", "train_ve_first_epoch")


def check_output_dir(args) -> None:
    """An output folder holding another run is never reused silently: a fresh run (no
    --resume_from_checkpoint) into a folder with checkpoints or a final model refuses to start,
    as does a `latest` resume whose model, data or schedule differ from the saved run's, each
    naming what differs; --overwrite_output_dir starts over."""
    out = Path(args.output_dir)
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
        before = json.loads(saved.read_text())
        now = json.loads(json.dumps(vars(args), default=str))
        changed = [f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in _RUN_DEFINING
                   if k in now and k in before and before[k] != now[k]]
        if changed:
            raise SystemExit(f"error: --resume_from_checkpoint latest would continue the run in {out}, but this run "
                             f"differs from it: {'; '.join(changed)}. {fix}.")


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


def make_scheduler(optimizer, args, total_steps: int):
    from transformers import get_scheduler
    warmup = args.warmup_steps if args.warmup_steps is not None else math.ceil(args.warmup_ratio * total_steps)
    if args.lr_scheduler == "one_cycle":
        # The knee seed's schedule. No momentum cycling: AdamW's beta1 stays as configured.
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=[g["lr"] for g in optimizer.param_groups], total_steps=max(total_steps, 1),
            pct_start=min(max(warmup / max(total_steps, 1), 1e-6), 0.999), anneal_strategy="cos",
            cycle_momentum=False)
    name = {"constant": "constant_with_warmup"}.get(args.lr_scheduler, args.lr_scheduler)
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


def steps_per_epoch(num_batches: int, grad_accum: int) -> int:
    return math.ceil(num_batches / grad_accum)


# ---------------------------------------------------------------- resume checkpoints

def save_checkpoint(accelerator: Accelerator, output_dir, step: int, state: dict,
                    total_limit: int | None = 2) -> Path:
    """Write OUTPUT_DIR/checkpoints/step_N atomically: save into a temporary folder and
    rename it when complete, so an interrupted save never looks like a checkpoint.
    Every process must call this (accelerate saves per-process RNG states)."""
    root = Path(output_dir) / CHECKPOINT_DIR
    final = root / f"step_{step}"
    tmp = root / f".tmp_step_{step}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
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
    return final


def list_checkpoints(output_dir) -> list[Path]:
    root = Path(output_dir) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    done = [p for p in root.glob("step_*") if (p / _STATE_FILE).exists()]
    return sorted(done, key=lambda p: int(p.name.split("_")[1]))


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
    if resume_from_checkpoint != "latest":
        path = resolve_resume(output_dir, resume_from_checkpoint)
        return load_checkpoint(accelerator, path) if path is not None else None
    candidates = list_checkpoints(output_dir)[::-1]
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


# ---------------------------------------------------------------- loop helpers

def epoch_batches(accelerator: Accelerator, dataloader, epoch: int, skip_batches: int = 0):
    """The dataloader for one epoch, in the order a fresh run would see it; on resume the
    first `skip_batches` are skipped without loading them twice."""
    if hasattr(dataloader, "set_epoch"):
        dataloader.set_epoch(epoch)
    return accelerator.skip_first_batches(dataloader, skip_batches) if skip_batches else dataloader


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
    """Count optimizer steps whose gradient is NaN/inf (and so were skipped); give up after
    `patience` such steps in a row (the run has diverged)."""

    def __init__(self, patience: int = 10):
        self.patience, self.bad = patience, 0

    def ok(self, value, step: int, skipped_by: str = "skipping the update") -> bool:
        value = torch.as_tensor(value, dtype=torch.float32)
        if torch.isfinite(value).all():
            self.bad = 0
            return True
        self.bad += 1
        logger.warning("step %d: non-finite gradient norm (%s); %s (%d in a row)",
                       step, value.item() if value.numel() == 1 else "tensor", skipped_by, self.bad)
        if self.bad >= self.patience:
            raise FloatingPointError(f"{self.bad} non-finite steps in a row at step {step}; "
                                     "lower --learning_rate or use --mixed_precision bf16")
        return False


class OptimizerStep:
    """One optimizer step over a window of micro-batches, the same for every trainer and engine.

    Every trainer computes its own exactly-normalised loss per micro-batch (the sum over the
    window is the step's loss) and calls `backward`; `finish` then clips, checks the gradient
    norm, steps, updates the fp16 scaler and zeroes the gradients. Engines differ in who does
    what, and this class is the one place that knows:

    - DDP / one process: gradients sync on the window's last micro-batch only (`no_sync`
      before it). The grad norm comes from `clip_grad_norm_` after the all-reduce, so every
      process takes the same skip decision.
    - fp16 (a GradScaler): an overflowed step must still go through `optimizer.step()`, which
      lets the scaler skip it and lower its scale; skipping the call instead leaves the
      scaler's per-step state behind and the next unscale raises.
    - DeepSpeed: the engine steps inside `backward` on the boundary micro-batch, clipping with
      its configured `gradient_clipping` (set from --max_grad_norm) and skipping overflowed
      fp16 steps itself; `optimizer.step()`/`zero_grad()` are no-ops and the norm is read back.
    - FSDP2: parameters are DTensors; accelerate's clip reduces the norm over shards.

    The accelerator is built with the run's accumulation count, so accelerate (or the DeepSpeed
    engine) divides each micro-batch loss by it; `backward` multiplies it back, which keeps the
    trainers' own normalisation exact for short last windows too.
    """

    def __init__(self, accelerator: Accelerator, optimizer, model, params, max_grad_norm: float,
                 patience: int = 10):
        self.acc, self.optimizer, self.model = accelerator, optimizer, model
        self.params = list(params)
        self.max_norm = max_grad_norm if max_grad_norm and max_grad_norm > 0 else float("inf")
        self.guard = NonFiniteGuard(patience)
        self.steps_taken = 0  # optimizer updates actually applied (skipped ones excluded)
        from accelerate.utils import DistributedType
        self.deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED

    def set_params(self, params) -> None:
        self.params = list(params)

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

    def finish(self, step: int):
        """Clip, check, step, update the scaler, zero the gradients. Returns (grad_norm, applied)."""
        acc = self.acc
        if self.deepspeed:
            grad_norm = acc.clip_grad_norm_(self.params, self.max_norm)  # the engine already stepped
            grad_norm = float("nan") if grad_norm is None else float(grad_norm)
            applied = self.guard.ok(grad_norm, step, "the engine skipped the update")
        else:
            grad_norm = acc.clip_grad_norm_(self.params, self.max_norm)
            finite = self.guard.ok(grad_norm, step, "the fp16 scaler skips the update and lowers its scale"
                                   if acc.scaler is not None else "skipping the update")
            if finite or acc.scaler is not None:
                # With a scaler, step() is the scaler's step: it skips an inf step and updates.
                self.optimizer.step()
            applied = finite and not acc.optimizer_step_was_skipped
            self.optimizer.zero_grad(set_to_none=True)
        self.steps_taken += int(applied)
        return grad_norm, applied


class StepLogger:
    """Progress bar, loss (mean over processes), lr, grad norm and samples/s every `every`
    optimizer steps and at the last one: the logging every trainer's loop shares."""

    def __init__(self, accelerator: Accelerator, scheduler, every: int, total_steps: int, initial: int, desc: str):
        from tqdm.auto import tqdm
        self.acc, self.scheduler, self.every, self.total = accelerator, scheduler, max(every, 1), total_steps
        self.bar = tqdm(total=total_steps, initial=initial, desc=desc, disable=not accelerator.is_local_main_process)
        self.tick, self.samples = time.perf_counter(), 0

    def step(self, step: int, epoch: int, loss, grad_norm, samples: int) -> None:
        self.samples += samples * self.acc.num_processes
        self.bar.update(1)
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

    def close(self):
        self.bar.close()
