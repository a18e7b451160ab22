"""ProjectionTrainerStage1: the vision tower and the LM are frozen; only the projector learns.

Only the projector goes through `accelerator.prepare`, so DDP all-reduces just its gradients and
a resume checkpoint holds just its weights and AdamW state (megabytes, not the LM's gigabytes).
"""
from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch

from accelerator_setup import count_parameters
from projectors import projector_of
from training.checkpoints import TrainableOnlyCheckpoints
from training.fsdp import full_state_dict, meta_copy, plain_copy
from training.loop import OneLossTrainer
from training.precision import frozen_in_stored_dtypes, master_weights
from training.speed import speed_options
from training.watch import log_metrics
from vlm import lm_loss_on_supervised, save_vlm

logger = logging.getLogger("siglip_med")


class ProjectionTrainerStage1(OneLossTrainer):
    """The loop (training/loop.py) with Stage1's step, validation and export."""
    loop_name = "stage1"

    def __init__(self, args, accelerator, model, tokenizer, image_processor, train_loader, val_loader=None):
        self.args, self.accelerator = args, accelerator
        self.model, self.tokenizer, self.image_processor = model, tokenizer, image_processor
        model.requires_grad_(False)
        model.eval()
        projector_of(model).requires_grad_(True)
        self.stored_dtypes = master_weights(model, args.mixed_precision)
        # Resume checkpoints hold the projector; the frozen tower and LM are fingerprinted (on CPU, before
        # they move to the device) so a resume onto other ones is refused.
        self.checkpoints = TrainableOnlyCheckpoints(accelerator, model, stored_dtypes=self.stored_dtypes)
        # The LM is frozen, but the projector's gradient flows back through all of it.
        speed_options(args, model, hot=[model.model.vision_tower, model.model.language_model],
                      grad_flow=[model.model.language_model])
        model.to(accelerator.device)
        projector = projector_of(model)
        self.params = list(projector.parameters())
        optimizer = torch.optim.AdamW(self.params, lr=args.learning_rate, weight_decay=args.weight_decay)
        self._projector_shape = meta_copy(projector)  # an export's plain copy, under FSDP
        self.projector, self.optimizer, self.train_loader = accelerator.prepare(projector, optimizer, train_loader)
        model.model.multi_modal_projector = self.projector
        self.set_up_steps(self.projector, train_loader, val_loader)
        total, trainable = count_parameters(model)
        logger.info("Stage1: %d parameters, %d trainable (projector); %d optimizer steps",
                    total, trainable, self.total_steps)

    # ------------------------------------------------------------ one optimizer step

    def _forward(self, batch):
        with self.accelerator.autocast():
            return lm_loss_on_supervised(self.model, batch["input_ids"], batch["attention_mask"],
                                         batch["pixel_values"], batch["labels"])

    def _optimizer_step(self, window, step):
        k, loss_sum = len(window), 0.0
        for batch in self.stepper.micro_batches(window):
            loss = self._forward(batch) / k
            self.stepper.backward(loss)
            loss_sum += loss.detach()
        grad_norm, _ = self.stepper.finish(step, loss_sum, window)
        self.scheduler.step()
        return loss_sum, grad_norm

    # ------------------------------------------------------------ the loop

    def finish(self, step):
        super().finish(step)
        self.model.model.multi_modal_projector = self.accelerator.unwrap_model(self.projector)

    # ------------------------------------------------------------ eval and export

    @torch.no_grad()
    def evaluate(self, step) -> float:
        """Caption loss per supervised token over the whole validation set."""
        if self._evaluated[0] == step:
            return self._evaluated[1]
        acc, total, count = self.accelerator, 0.0, 0
        for batch in self.val_loader:
            with acc.autocast():
                loss = lm_loss_on_supervised(self.model, batch["input_ids"], batch["attention_mask"],
                                             batch["pixel_values"], batch["labels"], reduction="sum")
            total += loss.float()
            count += (batch["labels"][:, 1:] != -100).sum()
        totals = acc.reduce(torch.stack([torch.as_tensor(total, device=acc.device, dtype=torch.float),
                                         torch.as_tensor(count, device=acc.device, dtype=torch.float)]), "sum")
        val = (totals[0] / totals[1].clamp(min=1)).item()
        log_metrics(acc, {"val/loss": val}, step)
        logger.info("step %d: val caption loss %.4f", step, val)
        self._evaluated = (step, val)
        return val

    def save(self, name) -> Path:
        """save_vlm with the plain projector (no DDP wrapper) cast to the LM's dtype, and the
        frozen parts in the dtypes their checkpoints were stored in. The VLM's one weights file
        holds the trained projector, so it differs per export; files an earlier export holds
        byte for byte (the tokenizer's) are hard links to it."""
        acc, out = self.accelerator, self.out / name
        acc.wait_for_everyone()
        full = full_state_dict(acc, self.projector)  # FSDP: every process sends its shards to the main one
        if acc.is_main_process:
            self.exports.before_write(out)
            with frozen_in_stored_dtypes(self.model, self.stored_dtypes):
                dtype = self.model.model.language_model.embed_tokens.weight.dtype
                plain = acc.unwrap_model(self.projector)
                if full is not None:  # a plain copy holding the gathered weights, not the shards
                    plain = plain_copy(self._projector_shape, full, self.projector)
                if plain.linear_1.weight.dtype != dtype:
                    plain = copy.deepcopy(plain).to(dtype)
                self.model.model.multi_modal_projector = plain
                try:
                    save_vlm(self.model, self.tokenizer, self.image_processor, out)
                finally:
                    self.model.model.multi_modal_projector = self.projector
            self.exports.after_write(out)
            logger.info("saved %s", out)
        acc.wait_for_everyone()
        return out
