"""Logging and watchers: metrics lines, the step logger, and the divergence watch."""
from __future__ import annotations

import json
import logging
import math
import statistics
import time
from pathlib import Path

import torch
from accelerate import Accelerator

from training import speed
from training.speed import CompileWatch

logger = logging.getLogger("siglip_med")


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
        self.compiled = CompileWatch(speed._compiled_blocks > 0)
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
