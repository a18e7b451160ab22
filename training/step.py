"""The optimizer step every stage shares (clipping, non-finite skips, the stop checks) and the LR
schedule with the step plan."""
from __future__ import annotations

import logging
import math
import signal
from pathlib import Path

import torch
from accelerate import Accelerator

from training.checkpoints import CHECKPOINT_DIR, save_checkpoint
from training.preemption import Preemption
from training.watch import DivergenceWatch, log_metrics

logger = logging.getLogger("siglip_med")


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
