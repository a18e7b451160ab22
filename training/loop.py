"""The training loop every stage runs. A stage's trainer supplies what is its own:

    trainer.train_step(window, step) -> (loss, grad_norm)  one optimizer step over an accumulation window
    trainer.window_samples(window) -> int                 samples in it, for the throughput line
    trainer.start_epoch(epoch)                            what changes per epoch (modes, a tower frozen)
    trainer.validate_first()                              the untrained model's validation, step 0
    trainer.end_of_epoch(epoch, step)                     validation and the epoch's export
    trainer.finish(step)                                  the final validation and export

and the attributes args, accelerator, stepper (training.step.OptimizerStep), scheduler,
train_loader, total_steps and num_epochs (training.step.plan_steps). The loop owns the rest,
the same in every stage: resume, what --max_steps and --num_epochs mean, step counting,
accumulation windows, logging, the checkpoint cadence, the preemption stop, and the stop on a
file that turned unreadable after the data check (under --on_bad_sample error), which also
checkpoints the last finished step first.
"""
from __future__ import annotations

from pathlib import Path

import torch

from image_loader import ImageLoadError
from training.checkpoints import resume_from, save_checkpoint
from training.data import EvalShard, accumulation_windows, epoch_batches
from training.exports import ExportCopies
from training.fsdp import is_fsdp
from training.step import OptimizerStep, make_scheduler, plan_steps, steps_per_epoch
from training.watch import StepLogger, warn_if_nothing_to_train


def run_training(trainer, name: str) -> int:
    """Train from the start or from the checkpoint --resume_from_checkpoint names; return the
    last step. A checkpoint is written every --checkpointing_steps, at each epoch's end (after
    its validation and export, so a resume continues exactly there) and where --max_steps stops
    inside an epoch, so every stop is resumable."""
    args, acc = trainer.args, trainer.accelerator
    trainer.stepper.catch_preemption()  # SIGTERM/SIGUSR1: finish the step, checkpoint, exit 0
    state = resume_from(acc, args.output_dir, args.resume_from_checkpoint) or {"step": 0, "epoch": 0,
                                                                                "batches_done": 0}
    step, total = state["step"], trainer.total_steps
    warn_if_nothing_to_train(step, total, args.output_dir)

    def checkpoint(epoch, done):
        save_checkpoint(acc, args.output_dir, step, {"epoch": epoch, "batches_done": done}, args.checkpoints_total_limit)

    if step == 0:
        trainer.validate_first()
    log = StepLogger(acc, trainer.scheduler, args.logging_steps, total, step, name)
    for epoch in range(state["epoch"], trainer.num_epochs):
        trainer.start_epoch(epoch)
        done = state["batches_done"] if epoch == state["epoch"] else 0
        batches = epoch_batches(acc, trainer.train_loader, epoch, skip_batches=done)
        windows = accumulation_windows(batches, args.gradient_accumulation_steps)
        while step < total:  # (a run resumed from its last step's checkpoint trains nothing more)
            window, error = _next_window(windows, acc)
            if error is not None:
                _stop_on_unreadable(error, step, lambda: checkpoint(epoch, done))
            if window is None:  # the epoch's end
                break
            loss, grad_norm = trainer.train_step(window, step)
            step, done = step + 1, done + len(window)
            log.step(step, epoch, loss, grad_norm, trainer.window_samples(window))
            if args.checkpointing_steps and step % args.checkpointing_steps == 0:
                checkpoint(epoch, done)
            trainer.stepper.stop_if_requested(step, {"epoch": epoch, "batches_done": done}, args, log.divergence)
        if done >= len(trainer.train_loader):
            trainer.end_of_epoch(epoch, step)
            checkpoint(epoch + 1, 0)
        elif step >= total:  # a --max_steps stop inside an epoch stays resumable
            checkpoint(epoch, done)
        if step >= total:
            break
    log.close()
    trainer.stepper.close()
    trainer.finish(step)
    acc.end_training()
    return step


def _next_window(windows, acc):
    """The next accumulation window (None at the epoch's end) and the error of a process that
    could not read a row of its own (a file that turned unreadable after the data check, under
    --on_bad_sample error; `skip` replaces such rows in the dataset). The processes agree on
    whether any failed, so that all of them stop at the same step instead of the others waiting
    at the next collective: one small all-reduce per step, with several processes only."""
    try:
        window, error = next(windows), None
    except StopIteration:
        window, error = None, None
    except ImageLoadError as e:
        window, error = None, e
    if acc.num_processes > 1:
        failed = acc.reduce(torch.tensor([float(error is not None)], device=acc.device), "sum").item()
        if failed and error is None:
            error = SystemExit("error: another process could not read a row of its data (its message is above); "
                               "every process stopped after the same step")
    return window, error


def _stop_on_unreadable(error, step: int, checkpoint) -> None:
    """Write a resume checkpoint of the last finished step (nothing trained is lost, and no row
    of the failed window had trained: the resume refetches it), then stop with the row's error."""
    if step > 0:
        checkpoint()
        fix = (f"a resume checkpoint of step {step} was written: fix or replace the file, then rerun with "
               "--resume_from_checkpoint latest (or train past such rows with --on_bad_sample skip)")
    else:
        fix = "no step had finished; fix or replace the file, or pass --on_bad_sample skip"
    if isinstance(error, SystemExit):
        raise SystemExit(f"{error.code}; {fix}")
    raise ImageLoadError(f"{error} {fix[0].upper()}{fix[1:]}.", path=error.path, row=error.row,
                         source=error.source) from error


def _unsupervised(batch: dict) -> dict:
    """A batch whose every label is ignored: its loss and token count are 0."""
    return {**batch, "labels": torch.full_like(batch["labels"], -100)}


class OneLossTrainer:
    """The loop's calls for a trainer whose validation is one loss, `evaluate(step)`, and whose
    export is one folder, `save(name)` (Stage1 and Stage2): its results dict records the loss
    before and after. The trainer gives `_optimizer_step(window, step)` and `loop_name`."""
    loop_name = "train"
    results: dict

    def set_up_steps(self, module, train_loader, val_loader) -> None:
        """Once `self.optimizer` and the prepared `self.train_loader` exist: this process's val
        shard, the step plan, the LR schedule, the optimizer step over `module`'s `self.params`,
        and the export folder."""
        args, acc = self.args, self.accelerator
        self.val_loader = EvalShard(acc, val_loader, blank=_unsupervised) if val_loader is not None else None
        self.steps_per_epoch = steps_per_epoch(len(self.train_loader), args.gradient_accumulation_steps)
        self.total_steps, self.num_epochs = plan_steps(args, self.steps_per_epoch)
        # Not prepared: accelerate would step it once per process, but total_steps is already
        # counted on the per-process loader. Registered so resume restores it.
        self.scheduler = make_scheduler(self.optimizer, args, self.total_steps)
        acc.register_for_checkpointing(self.scheduler)
        if is_fsdp(acc):  # fully_shard replaced the parameters the trainer listed, in place
            self.params = [p for p in module.parameters() if p.requires_grad]
        self.stepper = OptimizerStep(acc, self.optimizer, module, self.params, args.max_grad_norm,
                                     patience=args.max_nonfinite_steps, dataset=train_loader.dataset)
        self.out = Path(args.output_dir)
        self.exports = ExportCopies(self.out)
        self.results = {}
        self._evaluated = (None, None)

    def train(self) -> dict:
        run_training(self, self.loop_name)
        return self.results

    def train_step(self, window, step):
        return self._optimizer_step(window, step)

    @staticmethod
    def window_samples(window) -> int:
        return sum(len(b["input_ids"]) for b in window)

    def start_epoch(self, epoch):
        pass

    def validate_first(self):
        if self.val_loader is not None:
            self.results["val_loss_before"] = self.evaluate(0)

    def end_of_epoch(self, epoch, step):
        if self.val_loader is not None:
            self.results["val_loss"] = self.evaluate(step)
        if self.args.save_every_epoch:
            self.save(f"epoch_{epoch + 1}")

    def finish(self, step):
        if self.val_loader is not None:
            self.results["val_loss"] = self.evaluate(step)
        self.results.update(step=step, final_model=str(self.save("final_model")))
