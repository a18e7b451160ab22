"""VisionEncoderTrainerStage0: SigLIP contrastive fine-tuning of the vision tower.

Frozen text tower (the default): each distinct caption is embedded once before training and
looked up afterwards. Because frozen texts carry no gradient, the SigLIP loss of a batch is a
plain sum over its images, so gradient accumulation is *exact*: every micro-batch's images
meet the texts of every micro-batch of the step on every process, the negatives of one
large batch. With a trainable text tower the negatives are one micro-batch on every process
(said in a warning when accumulating).
"""
from __future__ import annotations

import contextlib
import json
import logging
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from accelerator_setup import count_parameters, unwrap
from training.checkpoints import TrainableOnlyCheckpoints
from training.data import loader_kwargs, shard_batches
from training.exports import ExportCopies
from training.fsdp import full_state_dict, is_fsdp, meta_copy, plain_copy
from training.loop import run_training
from training.precision import master_weights
from training.speed import speed_options
from training.step import OptimizerStep, make_scheduler, plan_steps, steps_per_epoch
from training.watch import log_metrics
from losses import gather_with_grad, siglip_loss, siglip_loss_global, world
from metrics import image_text_retrieval
from Stage0.dataset import collate_fn
from Stage0.labels import write_prompt_record
from Stage0.towers import IMAGE_DIR, TEXT_DIR, VISION_ENCODER_FILE, ContrastiveModel

logger = logging.getLogger("siglip_med")


class DualEncoder(torch.nn.Module):
    """One forward() for DDP: L2-normalised image and/or text embeddings plus the logit
    scale and bias (returned from forward so DDP sees them used when they train). Text comes
    as token ids (through the whole text tower) or as cached backbone features of a frozen
    text tower (through its head only, which may still train)."""

    def __init__(self, model: ContrastiveModel):
        super().__init__()
        self.model = model
        # FSDP wraps each of these classes as its own shard unit: every block, and each tower's
        # backbone, so that what is outside the blocks (a frozen LLM's embedding table) is gathered
        # only when that backbone runs (a frozen text backbone: once, for the caption cache), not
        # by the root unit at every step.
        backbones = (model.image.backbone, model.text.backbone)
        self._no_split_modules = sorted({c for m in backbones for c in (getattr(m, "_no_split_modules", None) or [])}
                                        | {type(m).__name__ for m in backbones})

    def forward(self, pixel_values=None, input_ids=None, attention_mask=None, text_features=None,
                backbone_features: bool = False):
        """(image, text, logit scale, logit bias); with `backbone_features`, the text slot holds
        the text backbone's features of `input_ids` (no head, not normalised). Everything runs
        through here, so that FSDP's hooks gather what each call reads."""
        img = txt = None
        if pixel_values is not None:
            img = F.normalize(self.model.image(pixel_values), dim=-1)
        if input_ids is not None and backbone_features:
            txt = self.model.text.features(input_ids, attention_mask)
        elif input_ids is not None:
            txt = F.normalize(self.model.text(input_ids, attention_mask), dim=-1)
        elif text_features is not None:
            txt = F.normalize(self.model.text.head(text_features), dim=-1)
        return img, txt, self.model.logit_scale, self.model.logit_bias


@torch.no_grad()
def embed_captions(encoder: DualEncoder, input_ids, attention_mask, batch_size, device, autocast,
                   features_only: bool = False, keep_dtype: bool = False):
    """Every caption's L2-normalised embedding, or (features_only) its text-backbone features,
    which a frozen backbone gives once for the whole run (in float32, or as autocast computed
    them with keep_dtype)."""
    out = []
    for s in range(0, input_ids.shape[0], batch_size):
        ids, mask = input_ids[s:s + batch_size].to(device), attention_mask[s:s + batch_size].to(device)
        with autocast():
            t = encoder(input_ids=ids, attention_mask=mask, backbone_features=features_only)[1]
        out.append(t if keep_dtype else t.float())
    return torch.cat(out)


@torch.no_grad()
def embed_cached(encoder: DualEncoder, features, batch_size, autocast) -> torch.Tensor:
    """Every caption's L2-normalised embedding from its cached backbone features (kept in the
    dtype autocast gave them) through the text head alone, batch by batch: the numbers
    embed_captions computes from the tokens."""
    out = []
    for s in range(0, features.shape[0], batch_size):
        with autocast():
            out.append(encoder(text_features=features[s:s + batch_size])[1].float())
    return torch.cat(out)


@torch.no_grad()
def evaluate_contrastive(encoder: DualEncoder, dataset, batch_size, device, autocast=contextlib.nullcontext,
                         num_workers=0, duplicates_positive: bool = True, text_features=None,
                         even_forwards: bool = False) -> dict[str, float]:
    """Val SigLIP loss (mean over batches of `batch_size` in file order) and R@1/R@5 both ways.
    `text_features`: the captions' cached features of a frozen text backbone (embed_captions
    with features_only, in batches of `batch_size`), which then need not be run.

    Under several processes every process must call this: each embeds its share of the
    batches (batch k on process k mod P), and the image embeddings and loss sums are gathered,
    so every process returns exactly the single-process metrics. `even_forwards` (FSDP, where
    every forward is a collective): a process with fewer batches runs the first one again as many
    times as it is short, and drops what it gives."""
    rank, ws = world()
    was_training = encoder.training
    encoder.eval()
    if text_features is not None:
        txt = embed_cached(encoder, text_features, batch_size, autocast)
    else:
        txt = embed_captions(encoder, dataset.input_ids, dataset.attention_mask, batch_size, device, autocast)
    mine, real, num_batches = shard_batches(len(dataset), batch_size, rank, ws, even=even_forwards)
    dl = DataLoader(dataset, batch_sampler=mine, collate_fn=collate_fn, **loader_kwargs(num_workers))
    rows, imgs = [], []
    loss_sum = torch.zeros((), device=device)
    for i, b in enumerate(dl):
        with autocast():
            img, _, scale, bias = encoder(pixel_values=b["pixel_values"].to(device))
        if i >= real:  # a blank forward (even_forwards)
            continue
        img = img.float()
        imgs.append(img)
        rows.append(b["index"].to(device))
        ids = b["caption_id"].to(device)
        pos = dict(image_labels=ids, text_labels=ids) if duplicates_positive else {}
        loss_sum += siglip_loss(img, txt[ids], scale, bias, **pos)
    encoder.train(was_training)
    dim = txt.shape[1]
    imgs = torch.cat(imgs) if imgs else torch.zeros(0, dim, device=device)
    rows = torch.cat(rows) if rows else torch.zeros(0, dtype=torch.long, device=device)
    if ws > 1:
        imgs, _ = gather_with_grad(imgs)
        rows, _ = gather_with_grad(rows)
        torch.distributed.all_reduce(loss_sum)
    imgs = imgs[rows.argsort()]  # back to file order
    metrics = image_text_retrieval(imgs, txt, dataset.caption_ids)
    # Contrastive accuracy (seed 003): top-1 both ways over the whole set, a repeated text
    # counting as correct for every image that carries it: R@1 over the distinct captions.
    return {"loss": (loss_sum / num_batches).item(), "acc_i2t": metrics["i2t_R@1"], "acc_t2i": metrics["t2i_R@1"],
            **metrics}


def freeze_unreached(model: ContrastiveModel, dataset, device, autocast=contextlib.nullcontext) -> list[str]:
    """Freeze the trainable parameters no forward pass reaches, naming them.

    A backbone loaded with AutoModel can hold parameters the contrastive forward never uses:
    DINOv2's mask token (masked-image pretraining only), BERT's pooler when the tower pools its
    own way. They never get a gradient, and DDP, which waits for every trainable parameter's
    gradient, fails on the second step. One forward and backward on two training samples finds
    them for whatever towers are plugged in (a list per model family would miss the next one);
    a frozen parameter trains exactly as before: it never received a gradient.

    The pass leaves no trace, so N processes train what one process trains: it runs in eval mode
    (no dropout draw; BatchNorm does not fold two samples into its running statistics, which
    moved a frozen Merlin backbone's statistics by 19% through the checkpoint recompute), every
    buffer is restored, and the RNG states (torch, CUDA, numpy, random) are put back."""
    import random

    import numpy as np
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    py_state, np_state = random.getstate(), np.random.get_state()
    devices = [torch.device(device).index or 0] if torch.device(device).type == "cuda" else []
    was_training = {m: m.training for m in model.modules()}
    model.to(device)
    model.eval()
    with torch.random.fork_rng(devices=devices):
        batch = collate_fn([dataset[0], dataset[min(1, len(dataset) - 1)]])
        total = model.logit_scale * 0
        with autocast():
            if any(p.requires_grad for p in model.image.parameters()):
                total = total + model.image(batch["pixel_values"].to(device)).float().sum()
            if any(p.requires_grad for p in model.text.parameters()):
                total = total + model.text(batch["input_ids"].to(device),
                                           batch["attention_mask"].to(device)).float().sum()
        total.backward()
    random.setstate(py_state)
    np.random.set_state(np_state)
    with torch.no_grad():
        for n, b in model.named_buffers():
            b.copy_(buffers[n])
    for m, mode in was_training.items():
        m.training = mode
    unreached = [n for n, p in model.named_parameters()
                 if p.requires_grad and p.grad is None and not n.startswith("logit_")]
    for n, p in model.named_parameters():
        p.grad = None
        if n in unreached:
            p.requires_grad_(False)
    if unreached:
        logger.info("frozen, as no forward pass reaches them (DDP needs a gradient for every trained "
                    "parameter): %s", ", ".join(unreached))
    return unreached


class VisionEncoderTrainerStage0:
    def __init__(self, args, accelerator, model, tokenizer, image_processor, train_dataset, val_dataset=None,
                 objective=None, class_prompts=None, prompt_record=None):
        """objective: a losses.LabelAwareObjective for labelled data (class_prompts: the class
        texts' token ids and mask, for its ICD term); default: the SigLIP loss on captions.
        prompt_record: the classes and template of a labelled run, written into every export
        (Stage0/labels.py PROMPTS_FILE) so evaluation and inference score the texts it trained on."""
        self.args, self.accelerator = args, accelerator
        self.prompt_record = prompt_record
        self.tokenizer, self.image_processor = tokenizer, image_processor
        self.train_dataset, self.val_dataset = train_dataset, val_dataset
        self.freeze_text = args.freeze_text_encoder
        # A caption repeated in the batch ("No acute cardiopulmonary process.") is a positive for
        # every image that carries it; as a negative it would push normal images away from the
        # normal caption (at equilibrium p(match) = 1/(1+d) for d duplicates).
        self.duplicates_positive = getattr(args, "duplicate_captions", "positive") == "positive"
        if model.lora is None:  # with LoRA only the adapters train (set by apply_lora)
            if model.text_lora is None:  # text LoRA: only its adapters train (set by apply_text_lora)
                model.text.backbone.requires_grad_(not args.freeze_text_encoder)
            model.text.head.requires_grad_(True)  # a new projection head always learns
            model.image.requires_grad_(not args.freeze_vision_encoder)
        model.logit_scale.requires_grad_(not args.freeze_logit_scale)
        model.logit_bias.requires_grad_(not args.freeze_logit_scale)
        if getattr(args, "freeze_image_backbone", False):  # phase 1: the heads learn on fixed features
            model.image.backbone.requires_grad_(False)
        self.stored_dtypes = master_weights(model, args.mixed_precision)
        if accelerator.num_processes > 1:
            freeze_unreached(model, train_dataset, accelerator.device, accelerator.autocast)
        total, trainable = count_parameters(model)
        logger.info("parameters: %s total, %s trainable (text tower %s, logit scale/bias %s)",
                    f"{total:,}", f"{trainable:,}", "frozen" if args.freeze_text_encoder else "trained",
                    "frozen" if args.freeze_logit_scale else "trained")
        if trainable == 0:
            raise ValueError("nothing to train: every tower and the logit scale are frozen")
        # The text tower runs every step unless it is frozen and its caption features cached.
        text_every_step = objective is not None or not args.freeze_text_encoder
        trains = [t for t in (model.image, model.text) if any(p.requires_grad for p in t.parameters())]
        self.encoder = DualEncoder(model)
        self.encoder_shape = None
        if is_fsdp(accelerator):
            # The shape exports fill with the gathered weights (taken before compile's wrappers).
            self.encoder_shape = meta_copy(self.encoder)
            # torch warns that a backbone unit's output is a view (SigLIP's pooled output, a CLS
            # token), on which an in-place op would skip the unit's gradient hook; nothing here
            # changes a tower's output in place (heads, normalisation and losses are out of place).
            warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(.*\) returned a view tensor")
        speed_options(args, model, grad_flow=trains, hot=[model.image] + ([model.text] if text_every_step else []))
        # Resume checkpoints hold the trained tensors; the frozen ones are fingerprinted once, here.
        self.checkpoints = TrainableOnlyCheckpoints(
            accelerator, self.encoder, stored_dtypes={f"model.{k}": v for k, v in self.stored_dtypes.items()})
        self.exports = ExportCopies(args.output_dir)

        decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
        no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
        # Norms, biases and the logit scale/bias are not weight-decayed (decaying t' and b
        # toward 0 would fight the loss's temperature).
        optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                       {"params": no_decay, "weight_decay": 0.0}],
                                      lr=args.learning_rate, betas=(0.9, 0.999), eps=1e-8)
        train_dl = DataLoader(train_dataset, batch_size=args.batch_size, shuffle=True, drop_last=True,
                              collate_fn=collate_fn, **loader_kwargs(args.num_workers))
        if len(train_dl) == 0:
            raise ValueError(f"{len(train_dataset)} training pairs is less than one batch of "
                             f"{args.batch_size}; lower --batch_size")
        self.encoder, self.optimizer, self.train_dl = accelerator.prepare(self.encoder, optimizer, train_dl)
        self.stepper = OptimizerStep(accelerator, self.optimizer, self.encoder,
                                     [p for p in self.encoder.parameters() if p.requires_grad], args.max_grad_norm,
                                     patience=args.max_nonfinite_steps, dataset=train_dataset)
        self.steps_per_epoch = steps_per_epoch(len(self.train_dl), args.gradient_accumulation_steps)
        self.total_steps, self.num_epochs = plan_steps(args, self.steps_per_epoch)
        # Stepped by hand (accelerate would step it once per process), checkpointed with the rest.
        self.scheduler = make_scheduler(self.optimizer, args, self.total_steps)
        accelerator.register_for_checkpointing(self.scheduler)
        self.text_cache = self.val_text_cache = None
        self.text_backbone_offloaded = False
        self.objective = objective
        if objective is not None:
            self.freeze_text = False  # the label-aware terms embed the texts every step
            self.class_prompts = tuple(t.to(accelerator.device) for t in class_prompts)
        if self.freeze_text:
            t0 = time.time()
            plain = unwrap(accelerator, self.encoder)
            backbone_mode = plain.model.text.backbone.training
            plain.model.text.backbone.eval()  # as in training (_set_modes) and validation: no dropout
            self.text_cache = embed_captions(plain, train_dataset.input_ids, train_dataset.attention_mask,
                                             args.batch_size, accelerator.device, accelerator.autocast,
                                             features_only=True)
            if val_dataset is not None:
                # In validation's own batches and dtype: its metrics are those of embedding the
                # captions every epoch.
                self.val_text_cache = embed_captions(plain, val_dataset.input_ids, val_dataset.attention_mask,
                                                     self._val_batch_size(), accelerator.device,
                                                     accelerator.autocast, features_only=True, keep_dtype=True)
            plain.model.text.backbone.train(backbone_mode)
            logger.info("embedded %d distinct captions once with the frozen text tower (%.1fs)",
                        len(self.text_cache) + (len(self.val_text_cache) if val_dataset is not None else 0),
                        time.time() - t0)
            self._offload_text_backbone()
        elif args.gradient_accumulation_steps > 1:
            logger.warning("trainable text tower with --gradient_accumulation_steps %d: each micro-batch's "
                           "negatives are that micro-batch on every process (%d), not the whole step's "
                           "batch. Raise --batch_size for more negatives.",
                           args.gradient_accumulation_steps, args.batch_size * accelerator.num_processes)

    def _val_batch_size(self) -> int:
        # The global batch, what the training loss sees: the same val loss for 1 x 16 and 2 x 8.
        return self.args.batch_size * self.accelerator.num_processes

    def _offload_text_backbone(self):
        """Once its caption features are cached, the frozen text backbone is not run again:
        its weights leave the accelerator (an 8B LLM2Vec tower frees 16 GB) for CPU memory,
        where the exports read them. Parameters only: the buffers (rotary frequencies, position
        ids: kilobytes) stay, since DDP broadcasts every buffer of the model at each forward and
        NCCL cannot send CPU tensors. Not under DeepSpeed, whose engine owns the parameters, nor
        under FSDP, whose shards of it (1/N of it on each GPU) stay where its unit put them."""
        from accelerate.utils import DistributedType
        if self.accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP):
            return
        backbone = unwrap(self.accelerator, self.encoder).model.text.backbone
        with torch.no_grad():
            for p in backbone.parameters():
                p.data = p.data.to("cpu")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        self.text_backbone_offloaded = True

    # -------------------------------------------------------------- one optimizer step
    def _set_modes(self):
        model = unwrap(self.accelerator, self.encoder).model
        model.train()
        if self.freeze_text:
            model.text.backbone.eval()
        if self.args.freeze_vision_encoder:
            model.image.eval()
        if getattr(self.args, "freeze_image_backbone", False):
            model.image.backbone.eval()  # BatchNorm statistics stay the checkpoint's

    def _step_frozen_text(self, window) -> torch.Tensor:
        dev = self.accelerator.device
        local_ids = torch.cat([b["caption_id"].to(dev) for b in window])
        # Every process's captions of the whole step: backbone features, fixed; the text head
        # (if any) is applied inside each micro-batch's forward, so it trains exactly too.
        all_feats, sizes = gather_with_grad(self.text_cache[local_ids])
        all_ids, _ = gather_with_grad(local_ids)
        offset = sum(sizes[:world()[0]])
        n_local, total = local_ids.shape[0], 0.0
        for b in self.stepper.micro_batches(window):
            n = b["pixel_values"].shape[0]
            with self.accelerator.autocast():
                img, all_txt, scale, bias = self.encoder(pixel_values=b["pixel_values"], text_features=all_feats)
            if self.duplicates_positive:  # every row with this caption, on any process, is a positive
                pos = dict(image_labels=b["caption_id"].to(dev), text_labels=all_ids)
            else:
                pos = dict(positive_index=torch.arange(n, device=dev) + offset)
            loss = siglip_loss(img, all_txt, scale, bias, **pos) * (n / n_local)
            self.stepper.backward(loss)
            offset += n
            total += loss.detach()
        return total

    def _step_label_aware(self, window, step) -> torch.Tensor:
        """The labelled recipe: text through the tower every step (its adapters or weights train),
        the LabelAwareObjective on each micro-batch; its terms and coefficients are logged."""
        total, terms = 0.0, {}
        for b in self.stepper.micro_batches(window):
            with self.accelerator.autocast():
                img, txt, scale, bias = self.encoder(b["pixel_values"], b["input_ids"], b["attention_mask"])
                classes = None
                if self.objective.alpha:  # class prompts through the text tower, for the ICD geometry
                    classes = self.encoder(input_ids=self.class_prompts[0], attention_mask=self.class_prompts[1])[1]
            loss, terms = self.objective(img, txt, scale, bias, b["labels"], step, class_embeddings=classes)
            loss = loss / len(window)
            self.stepper.backward(loss)
            total += loss.detach()
        log_metrics(self.accelerator, {f"train/{k}": v for k, v in terms.items()}, step + 1)  # every step
        return total

    def _step_trained_text(self, window) -> torch.Tensor:
        total = 0.0
        for b in self.stepper.micro_batches(window):
            with self.accelerator.autocast():
                img, txt, scale, bias = self.encoder(b["pixel_values"], b["input_ids"], b["attention_mask"])
            labels = b["caption_id"] if self.duplicates_positive else None
            loss = siglip_loss_global(img, txt, scale, bias, labels=labels) / len(window)
            self.stepper.backward(loss)
            total += loss.detach()
        return total

    # -------------------------------------------------------------- loop
    def train(self):
        run_training(self, "stage0")  # training/loop.py: resume, epochs, checkpoints, stops

    # ------------------------------------------------------------ what the loop calls

    def train_step(self, window, step):
        if self.objective is not None:
            loss = self._step_label_aware(window, step)
        else:
            loss = (self._step_frozen_text if self.freeze_text else self._step_trained_text)(window)
        grad_norm, _ = self.stepper.finish(step, loss, window)
        self.scheduler.step()
        return loss, grad_norm

    @staticmethod
    def window_samples(window) -> int:
        return sum(b["pixel_values"].shape[0] for b in window)

    @property
    def train_loader(self):
        return self.train_dl

    def start_epoch(self, epoch):
        self._set_modes()

    def validate_first(self):
        if self.val_dataset is not None:
            self.validate(0, 0)  # the untrained model's numbers, for comparison (step 0 in metrics.jsonl)

    def finish(self, step):
        self.save_model(Path(self.args.output_dir) / "final_model")

    def validate(self, epoch: int, step: int) -> dict:
        """Val metrics on every process (each on its share), logged by the main one."""
        m = evaluate_contrastive(unwrap(self.accelerator, self.encoder), self.val_dataset, self._val_batch_size(),
                                 self.accelerator.device, self.accelerator.autocast,
                                 duplicates_positive=self.duplicates_positive, text_features=self.val_text_cache,
                                 even_forwards=is_fsdp(self.accelerator))
        logger.info("epoch %d val: %s", epoch, " ".join(f"{k}={v:.4f}" for k, v in m.items()))
        log_metrics(self.accelerator, {f"val/{k}": v for k, v in m.items()}, step)
        self._set_modes()
        return m

    def end_of_epoch(self, epoch: int, step: int):
        epoch += 1  # the epoch just finished, counted from 1
        if self.val_dataset is not None:  # on every process, each on its share
            self._keep_best(self.validate(epoch, step), epoch, step)
        if self.args.save_epoch_models:
            self.save_model(Path(self.args.output_dir) / f"epoch_{epoch}")

    def _keep_best(self, metrics: dict, epoch: int, step: int):
        """OUTPUT_DIR/best_model/: the model with the lowest val loss so far. Its metrics file
        is the record, so a resumed run keeps comparing against the best before the stop."""
        best = Path(self.args.output_dir) / "best_model"
        record = best / "val_metrics.json"
        previous = [float("inf")]
        if self.accelerator.is_main_process and record.is_file():
            previous = [json.loads(record.read_text())["loss"]]
        # One decision for every process (save_model waits for all of them); the record is the
        # main process's, which other nodes may not see on their own disks.
        from accelerate.utils import broadcast_object_list
        previous = broadcast_object_list(previous)[0] if self.accelerator.num_processes > 1 else previous[0]
        if metrics["loss"] < previous:
            self.save_model(best)
            if self.accelerator.is_main_process:
                record.write_text(json.dumps({**metrics, "epoch": epoch, "step": step}, indent=2))

    def _unchanged_parts(self, model) -> list[str]:
        """The parts of a towers folder no step can change (a frozen backbone, its BatchNorm
        statistics included: no tensor of it is trained state): linked from the run's first copy."""
        if model.siglip is not None:
            return []
        parts = []
        if not self.checkpoints.trains("model.image.backbone."):
            parts += [IMAGE_DIR, VISION_ENCODER_FILE]
        if not self.checkpoints.trains("model.text.backbone."):
            parts.append(TEXT_DIR)
        return parts

    def save_model(self, out_dir: Path):
        """vision_encoder.bin (the seed's file) and the model in Hugging Face format: the whole
        SiglipModel for one pretrained SigLIP, else a towers folder (see Stage0/towers.py);
        processor and tokenizer files with it. What an earlier export of the run holds
        unchanged (a frozen tower, tokenizer files) is a hard link to that copy."""
        self.accelerator.wait_for_everyone()
        full = full_state_dict(self.accelerator, self.encoder)  # FSDP: every process sends its shards to the main one
        if self.accelerator.is_main_process:
            model = unwrap(self.accelerator, self.encoder).model
            if full is not None:  # a plain copy holding the gathered weights, not the shards
                model = plain_copy(self.encoder_shape, full, self.encoder,
                                   also=lambda e: [e.model.siglip] if e.model.siglip is not None else []).model
            parts = self._unchanged_parts(model)
            self.exports.before_write(out_dir)
            linked = self.exports.link_parts(out_dir, parts)
            model.save_pretrained(out_dir, self.tokenizer, self.image_processor, skip=linked)
            self.exports.after_write(out_dir, parts)
            if self.prompt_record is not None:
                write_prompt_record(out_dir, self.prompt_record)
            logger.info("saved %s", out_dir)
        self.accelerator.wait_for_everyone()
