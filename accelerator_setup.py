"""setup_accelerator_and_logging(): the Accelerator, the tracker, precision and engine checks,
seeding and logging, which every stage calls first. Only the main process prints, logs and
writes files.

The rest of the machinery the stages share lives in training/, one file per job: the loop
(loop.py), the step (step.py), checkpoints and resume (checkpoints.py), preemption, logging and
watchers (watch.py), speed options, precision, data helpers and exports.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from pathlib import Path

from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed

from training.checkpoints import _move_previous_run_aside, check_output_dir
from training.precision import resolve_mixed_precision
from training.shared_folder import check_shared_output_dir
from training.speed import check_attn_implementation

logger = logging.getLogger("siglip_med")


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


# Every stage runs on every engine: one process, DDP, DeepSpeed ZeRO-2 (optimizer state and
# gradients sharded) and FSDP2 (scripts/accelerate/fsdp.yaml; the weights sharded too, which a
# full fine-tune of a 12B-27B Gemma needs; training/fsdp.py: sharded resume checkpoints, exports
# gathered to one process). What is refused is a flag a sharded engine cannot serve.


def check_engine(accelerator, stage: str, args) -> None:
    """Refuse, before any model loads, a flag the engine cannot serve, naming the engines that can."""
    from accelerate.utils import DistributedType
    engine = accelerator.distributed_type
    if engine in (DistributedType.DEEPSPEED, DistributedType.FSDP) and getattr(args, "train_ve_first_epoch", False):
        raise SystemExit(f"error: {stage} cannot run under {engine.value}: --train_ve_first_epoch stops training "
                         "the vision tower after epoch 1, and a sharded engine's trained parameters are fixed when "
                         "it is built. Engines that work: one process (scripts/accelerate/single.yaml), DDP (ddp.yaml).")


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
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and accelerator.num_processes == 1:
        # The multi-GPU config on a machine without GPUs: every process would train alone,
        # all of them into one output folder.
        raise SystemExit(f"error: {launched} processes were launched, but each runs alone ({accelerator.device}, "
                         "no GPU for the multi-GPU config): set ACCELERATE_USE_CPU=true to train on CPU processes, "
                         "or NUM_GPUS=1")
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
        part = out / "args.json.tmp"  # replaced whole: a crash mid-write leaves the previous record
        part.write_text(json.dumps(vars(args), indent=2, default=str))
        part.replace(out / "args.json")
    check_shared_output_dir(accelerator, out)  # several machines: one folder that all of them see
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


def unwrap(accelerator: Accelerator, model):
    return accelerator.unwrap_model(model, keep_torch_compile=False)


def count_parameters(model) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable
