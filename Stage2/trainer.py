"""VQATrainerStage2: instruction tuning on (image, question, answer) triplets.

What trains is set by flags: the LM (default; fully, or through LoRA adapters with --lora_r),
the projector (--unfreeze_projection_layer) and the vision tower during the first epoch only
(--train_ve_first_epoch, CheXagent's recipe). The loss is the causal-LM cross-entropy on the
answer tokens, normalised by the number of answer tokens in the whole optimizer step (every
micro-batch on every process), so accumulation and multi-GPU equal one large batch.

Each part has its own AdamW parameter groups and only trained parameters enter the optimizer.
A part that stops training gets `grad = None`: AdamW skips such parameters entirely, whereas a
zero gradient would still apply weight decay and the momentum left from earlier steps.
"""
from __future__ import annotations

import copy
import logging
from pathlib import Path

import torch
from torch import nn

from accelerator_setup import count_parameters
from training.checkpoints import TrainableOnlyCheckpoints
from training.exports import add_lora_deltas
from training.fsdp import full_state_dict
from training.loop import OneLossTrainer
from training.precision import master_weights
from training.speed import speed_options
from training.watch import log_metrics
from vlm import lm_loss_on_supervised, save_vlm

logger = logging.getLogger("siglip_med")

LANGUAGE_MODEL_DIR, VISION_TOWER_DIR, LORA_DIR = "language_model", "vision_tower", "lora_adapter"
TRAINABLE_FILE = "trainable_weights.safetensors"  # in resume checkpoints, instead of the whole VLM (its name since the first)


class SupervisedLM(nn.Module):
    """One forward() for DDP (gradients are only all-reduced for work done inside it)."""

    def __init__(self, vlm):
        super().__init__()
        self.vlm = vlm
        # FSDP wraps each of these block classes as its own shard unit.
        self._no_split_modules = list(getattr(vlm, "_no_split_modules", None) or [])

    def forward(self, input_ids, attention_mask, pixel_values, labels, reduction="mean", token_type_ids=None):
        return lm_loss_on_supervised(self.vlm, input_ids, attention_mask, pixel_values, labels, reduction=reduction,
                                     token_type_ids=token_type_ids)


def part_of(name: str) -> str:
    if name.startswith("model.vision_tower."):
        return "vision"
    if name.startswith("model.multi_modal_projector."):
        return "projector"
    return "llm"


def param_groups(model, weight_decay: float) -> list[dict]:
    """AdamW groups per part; norms and biases are not decayed. Sorted so that a resumed run
    builds the same groups in the same order as the run that saved the optimizer state."""
    groups: dict[tuple[str, bool], list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault((part_of(name), p.ndim >= 2), []).append(p)
    return [{"params": ps, "weight_decay": weight_decay if decay else 0.0,
             "name": f"{part}/{'decay' if decay else 'no_decay'}"}
            for (part, decay), ps in sorted(groups.items())]


def lora_targets(args, model) -> list[str]:
    """--lora_target_modules as module names; `all-linear` (Google's MedGemma recipe) is every
    linear layer inside the LM, read off the model. Unlike PEFT's own `all-linear`, which would
    also adapt the vision tower's layers, the tower trains only through --train_ve_first_epoch."""
    names = [m.strip() for m in args.lora_target_modules.split(",") if m.strip()]
    if names == ["all-linear"]:
        lm = model.model.language_model
        names = sorted({n.rsplit(".", 1)[-1] for n, m in lm.named_modules() if isinstance(m, nn.Linear)})
    return names


def lora_config(args, modules_to_save, model=None):
    from peft import LoraConfig
    names = "|".join(lora_targets(args, model) if model is not None else
                     [m.strip() for m in args.lora_target_modules.split(",") if m.strip()])
    # A regex, so the vision tower's own q_proj/k_proj/v_proj are never adapted.
    return LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                      target_modules=rf".*\.language_model\..*\.({names})", modules_to_save=modules_to_save or None,
                      bias="none")


def language_model_of(vlm):
    """The VLM's LM as a standalone causal LM (the seed's `language_model/` folder), sharing
    the VLM's tensors: build_vlm's assembly in reverse, by module state dicts."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM
    with init_empty_weights(include_buffers=False):
        lm = AutoModelForCausalLM.from_config(vlm.config.text_config)
    getattr(lm, lm.base_model_prefix).load_state_dict(vlm.model.language_model.state_dict(), strict=True, assign=True)
    lm.lm_head.load_state_dict(vlm.lm_head.state_dict(), strict=True, assign=True)
    if vlm.config.text_config.tie_word_embeddings:
        lm.lm_head.weight = getattr(lm, lm.base_model_prefix).embed_tokens.weight
    lm.generation_config = copy.deepcopy(vlm.generation_config)
    return lm


def vlm_name(peft_name: str) -> str | None:
    """A parameter's name in the plain VLM, from its name under a PEFT wrapper (None for the
    adapters themselves and for modules_to_save's untouched originals)."""
    if "lora_" in peft_name or ".original_module." in peft_name:
        return None
    name = peft_name.removeprefix("base_model.model.")
    return name.replace(".modules_to_save.default", "").replace(".base_layer", "")


def _adapter_state(peft_model, full: dict | None) -> dict | None:
    """Under FSDP, the adapter's tensors (and modules_to_save) from the gathered state dict, named
    as peft names them; None: peft reads the live model."""
    if full is None:
        return None
    return {"base_model.model." + k.removeprefix("vlm."): v for k, v in full.items()}


class VQATrainerStage2(OneLossTrainer):
    """The loop (training/loop.py) with Stage2's step, validation and export."""
    loop_name = "stage2"

    def __init__(self, args, accelerator, model, tokenizer, image_processor, train_loader, val_loader=None,
                 base_loader=None, processor=None):
        """base_loader(): the VLM this run started from, built again on CPU in the checkpoints'
        own dtypes. The export takes every weight that did not train from it, and merges LoRA
        into its weights, instead of into the bf16 training copies. `processor`: a --base_vlm
        model's own processor, saved with its export (base_vlm.save_base_vlm)."""
        self.args, self.accelerator = args, accelerator
        self.tokenizer, self.image_processor, self.processor = tokenizer, image_processor, processor
        self.vlm, self.peft, self.base_loader = model, None, base_loader
        self.train_vision = bool(args.train_ve_first_epoch)
        # The parts whose weights change in this run (the vision tower stays in after epoch 1).
        self.trained_parts = {part for part, on in (("llm", args.unfreeze_llm and not args.lora_r),
                                                    ("projector", args.unfreeze_projection_layer),
                                                    ("vision", self.train_vision)) if on}
        self._configure_trainable(model)
        # Gradients flow through the LM whatever trains (the projector sits below it).
        speed_options(args, model, hot=[model.model.vision_tower, model.model.language_model],
                      grad_flow=[model.model.language_model] + ([model.model.vision_tower] if self.train_vision else []))
        if getattr(model, "hf_quantizer", None) is None:  # a 4-bit model is placed on its GPU as it loads
            model.to(accelerator.device)
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("nothing to train: pass --unfreeze_llm, --unfreeze_projection_layer or "
                             "--train_ve_first_epoch")
        optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.learning_rate)
        if self.train_vision and accelerator.num_processes > 1:
            # The vision tower stops receiving gradients after epoch 1; DDP must be told that
            # parameters it was built with may go unused, or it waits for them forever.
            from accelerate.utils import DistributedDataParallelKwargs
            accelerator.ddp_handler = DistributedDataParallelKwargs(find_unused_parameters=True)
        plain = SupervisedLM(model)
        # Resume checkpoints hold what trains (plus the optimizer state), not the frozen VLM:
        # megabytes for LoRA or a projector instead of gigabytes at 1B parameters.
        self.checkpoints = TrainableOnlyCheckpoints(accelerator, plain, keeps=self._keeps, filename=TRAINABLE_FILE,
                                                    stored_dtypes={f"vlm.{k}": v for k, v in self.stored_dtypes.items()})
        self.module, self.optimizer, self.train_loader = accelerator.prepare(plain, optimizer, train_loader)
        self.set_up_steps(self.module, train_loader, val_loader)
        total, trainable = count_parameters(model)
        by_part = {}
        for name, p in model.named_parameters():
            if p.requires_grad:
                by_part[part_of(name)] = by_part.get(part_of(name), 0) + p.numel()
        logger.info("Stage2: %s parameters, %s trainable (%s)%s; %d optimizer steps", f"{total:,}", f"{trainable:,}",
                    ", ".join(f"{k} {v:,}" for k, v in sorted(by_part.items())),
                    " [vision tower: epoch 1 only]" if self.train_vision else "", self.total_steps)

    # ------------------------------------------------------------ resume checkpoints

    def _keeps(self, name: str, p) -> bool:
        """A parameter that a resume checkpoint must hold: trainable now, or of a part that
        trained in this run (the vision tower keeps its epoch-1 weights after it freezes)."""
        key = vlm_name(name.removeprefix("vlm."))
        return p.requires_grad or (key is not None and part_of(key) in self.trained_parts)

    # ------------------------------------------------------------ what trains

    def _configure_trainable(self, model):
        args = self.args
        lm_full = args.unfreeze_llm and not args.lora_r
        model.requires_grad_(False)
        for part in (model.model.language_model, model.lm_head):
            part.requires_grad_(lm_full)
        model.model.multi_modal_projector.requires_grad_(args.unfreeze_projection_layer)
        model.model.vision_tower.requires_grad_(self.train_vision)
        quantized = getattr(model, "hf_quantizer", None) is not None  # 4-bit weights keep their storage
        if args.mixed_precision == "bf16" and not quantized:
            # Weights that never train are stored in bf16 (half the memory); trained ones are
            # fp32 (master_weights below) and autocast computes in bf16. fp16 storage overflows in Gemma.
            # FSDP takes both in one shard unit: torch asks one dtype only of a unit's trained parameters.
            for part, trained in ((model.model.vision_tower, self.train_vision),
                                  (model.model.multi_modal_projector, args.unfreeze_projection_layer),
                                  (model.model.language_model, lm_full)):
                if not trained:
                    part.to(torch.bfloat16)
        if args.lora_r:
            from peft import get_peft_model
            save = [n for n, on in (("multi_modal_projector", args.unfreeze_projection_layer),
                                    ("vision_tower", self.train_vision)) if on]
            # modules_to_save: a trained projector (and vision tower) is stored with the adapter,
            # so the adapter folder alone restores the whole fine-tune.
            self.peft = get_peft_model(model, lora_config(args, save, model))
            assert self.peft.base_model.model is model  # LoRA is injected in place
        self.stored_dtypes = master_weights(model, args.mixed_precision)

    def _set_modes(self):
        """train() only where something trains: dropout stays off in frozen parts."""
        args, vlm = self.args, self.vlm
        vlm.eval()
        if args.unfreeze_llm:
            vlm.model.language_model.train()
        if args.unfreeze_projection_layer:
            vlm.model.multi_modal_projector.train()
        if self.train_vision:
            vlm.model.vision_tower.train()

    def _freeze_vision_tower(self):
        tower = self.vlm.model.vision_tower
        tower.requires_grad_(False)
        tower.eval()
        for p in tower.parameters():
            p.grad = None
        self.params = [p for p in self.params if p.requires_grad]
        self.stepper.set_params(self.params)
        self.train_vision = False
        logger.info("vision tower frozen from epoch 2 on (--train_ve_first_epoch)")

    # ------------------------------------------------------------ one optimizer step

    def _optimizer_step(self, window, step):
        acc = self.accelerator
        n_local = sum(int((b["labels"][:, 1:] != -100).sum()) for b in window)
        n_global = acc.reduce(torch.tensor(float(n_local), device=acc.device), "sum").clamp(min=1)
        # DDP averages gradients over processes; the factor turns that into a sum over all
        # processes' answer tokens divided by their total count.
        scale = acc.num_processes / n_global
        loss_sum = torch.zeros((), device=acc.device)
        for batch in self.stepper.micro_batches(window):
            with acc.autocast():
                loss = self.module(batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
                                   batch["labels"], reduction="sum", token_type_ids=batch.get("token_type_ids")) * scale
            self.stepper.backward(loss)
            loss_sum += loss.detach()
        grad_norm, _ = self.stepper.finish(step, loss_sum, window)
        self.scheduler.step()
        return loss_sum, grad_norm

    # ------------------------------------------------------------ the loop

    def start_epoch(self, epoch):
        if self.train_vision and epoch >= 1:
            self._freeze_vision_tower()
        self._set_modes()

    def finish(self, step):
        super().finish(step)
        self.vlm.eval()

    # ------------------------------------------------------------ eval and export

    @torch.no_grad()
    def evaluate(self, step) -> float:
        """Answer loss per supervised token (answer + <end_of_turn>) over the validation set."""
        if self._evaluated[0] == step:
            return self._evaluated[1]
        acc, total, count = self.accelerator, 0.0, 0
        plain = acc.unwrap_model(self.module)
        was_training = {m: m.training for m in self.vlm.modules()}
        self.vlm.eval()
        for batch in self.val_loader:
            with acc.autocast():
                loss = plain(batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["labels"],
                             reduction="sum", token_type_ids=batch.get("token_type_ids"))
            total += loss.float()
            count += (batch["labels"][:, 1:] != -100).sum()
        for m, mode in was_training.items():
            m.training = mode
        totals = acc.reduce(torch.stack([torch.as_tensor(total, device=acc.device, dtype=torch.float),
                                         torch.as_tensor(count, device=acc.device, dtype=torch.float)]), "sum")
        val = (totals[0] / totals[1].clamp(min=1)).item()
        log_metrics(acc, {"val/loss": val}, step)
        logger.info("step %d: val answer loss %.4f", step, val)
        self._evaluated = (step, val)
        return val

    def export_model(self, full: dict | None = None):
        """The plain VLM to save (LlavaForConditionalGeneration, or the --base_vlm model's own
        class), as if trained in full precision:
        - weights that never trained are the checkpoint's own (not their bf16 training copies);
        - trained weights are cast once, to the checkpoint's dtype;
        - LoRA is merged in fp32 on CPU into the checkpoint's weights: W + B·A·alpha/r. Merging
          into bf16 copies (merge_and_unload) applies the delta off by 3-30% at real magnitudes.
        Without LoRA, with everything stored and trained in fp32, the live model is already exactly that.
        `full`: under FSDP, the gathered state dict of the trainer's module (its keys start with
        `vlm.`); the live parameters are shards."""
        downcast = any(p.dtype != torch.float32 for p in self.vlm.parameters()) or bool(self.stored_dtypes)
        if full is None and (self.base_loader is None or (self.peft is None and not downcast)):
            model = self.vlm
            dtype = model.model.language_model.embed_tokens.weight.dtype
            if any(p.dtype != dtype for p in model.parameters()):
                model = copy.deepcopy(model).to(dtype)
            return model
        model = self.base_loader()
        state = model.state_dict()
        live = self.peft if self.peft is not None else self.vlm
        peft_prefix = "base_model.model." if self.peft is not None else ""
        # {name under `live`: tensor}: the gathered full tensors under FSDP, else the live ones.
        # Every name of a shared tensor: with a tied embedding and LM head, the head's key would
        # otherwise keep the base's table and overwrite the trained one on loading.
        tensors = ({peft_prefix + k.removeprefix("vlm."): v for k, v in full.items()} if full is not None
                   else dict(live.named_parameters(remove_duplicate=False)))
        with torch.no_grad():
            for name, p in tensors.items():
                key = vlm_name(name)
                if key is not None and part_of(key) in self.trained_parts:
                    state[key] = p.detach().to("cpu", state[key].dtype)
            if self.peft is not None:
                add_lora_deltas(state, self.peft, key_of=vlm_name, weights=tensors)
        model.load_state_dict(state, strict=True)
        return model

    def save(self, name) -> Path:
        """OUTPUT_DIR/name/: the VLM in Hugging Face format (+ `projection_layer/`), the LM alone
        in `language_model/`, the vision tower in `vision_tower/` when it was trained, and the
        LoRA adapter in `lora_adapter/` when LoRA is on. A file an earlier export of the run
        holds unchanged (a frozen LM's `language_model/`, the vision tower after epoch 1) is a
        hard link to that copy."""
        acc, out = self.accelerator, self.out / name
        acc.wait_for_everyone()
        full = full_state_dict(acc, self.module)  # FSDP: every process sends its shards to the main one
        if acc.is_main_process and self.processor is not None:
            self._save_base_vlm(out, full)
        elif acc.is_main_process:
            self.exports.before_write(out)
            model = self.export_model(full)
            if "vision" in self.trained_parts:  # the projector now reads the fine-tuned tower
                model.vision_tower_source = str(out / VISION_TOWER_DIR)
            save_vlm(model, self.tokenizer, self.image_processor, out)
            lm = language_model_of(model)
            lm.save_pretrained(out / LANGUAGE_MODEL_DIR, safe_serialization=True)
            self.tokenizer.save_pretrained(out / LANGUAGE_MODEL_DIR)
            if self.args.train_ve_first_epoch:
                # The triple (--llm_path, --projector_path, --vision_model_name) of the inference
                # CLI needs the fine-tuned tower, not the one the run started from.
                model.model.vision_tower.save_pretrained(out / VISION_TOWER_DIR, safe_serialization=True)
                self.image_processor.save_pretrained(out / VISION_TOWER_DIR)
            if self.peft is not None:
                self.peft.save_pretrained(out / LORA_DIR, state_dict=_adapter_state(self.peft, full))
            self.exports.after_write(out)
            logger.info("saved %s", out)
        acc.wait_for_everyone()
        return out

    def _save_base_vlm(self, out, full=None):
        """A --base_vlm run's export: the fine-tuned model in its own class with its processor
        (no seed folders: it has no separate projector or LM to hand on), plus `lora_adapter/`."""
        from base_vlm import save_base_vlm
        self.exports.before_write(out)
        save_base_vlm(self.export_model(full), self.processor, out)
        if self.peft is not None:
            self.peft.save_pretrained(out / LORA_DIR, state_dict=_adapter_state(self.peft, full))
        self.exports.after_write(out)
        logger.info("saved %s", out)
