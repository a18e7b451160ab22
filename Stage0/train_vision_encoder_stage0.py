"""Stage 0: fine-tune a pretrained SigLIP vision encoder on image-caption pairs.

The text tower and the logit scale/bias stay frozen by default (seed 000); only the vision
tower learns to place images next to their captions under the SigLIP loss.

    accelerate launch Stage0/train_vision_encoder_stage0.py \\
        --model_name StanfordAIMI/XraySigLIP__vit-l-16-siglip-384__webli \\
        --train_json data/train.json --image_root data/ --output_dir runs/stage0
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

if __package__ in (None, ""):  # `python Stage0/train_vision_encoder_stage0.py` from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from transformers import AutoImageProcessor, AutoModel, AutoTokenizer, SiglipVisionModel

from accelerator_setup import add_common_args, setup_accelerator_and_logging
from Stage0.dataset import ImageTextContrastiveDataset
from Stage0.trainer import VisionEncoderTrainerStage0

logger = logging.getLogger("siglip_med")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model and data")
    g.add_argument("--model_name", default="StanfordAIMI/XraySigLIP__vit-l-16-siglip-384__webli",
                   help="hub id or local folder of a SigLIP checkpoint (or a Stage0 final_model/)")
    g.add_argument("--train_json", required=True, help='JSON list of {"image": ..., "caption": ...}')
    g.add_argument("--val_json", default=None, help="same format; val loss and R@1/R@5 each epoch")
    g.add_argument("--image_root", default="", help="folder that the JSON's image paths are relative to")
    g.add_argument("--image_key", default="image")
    g.add_argument("--caption_key", default="caption")
    g.add_argument("--max_text_length", type=int, default=None,
                   help="default and maximum: the checkpoint's text length (max_position_embeddings)")
    g.add_argument("--duplicate_captions", choices=["positive", "negative"], default="positive",
                   help="a caption repeated in the batch: a positive for every image that carries it "
                        "(default), or a negative for all but its own row as in the SigLIP paper, whose "
                        "web captions are unique")
    g.add_argument("--text_attention_mask", action="store_true",
                   help="pass the padding mask to the text tower (pretrained SigLIP never saw one)")
    g = p.add_argument_group("what trains")
    g.add_argument("--no_freeze_text_encoder", dest="freeze_text_encoder", action="store_false",
                   help="also train the text tower (default: frozen)")
    g.add_argument("--no_freeze_logit_scale", dest="freeze_logit_scale", action="store_false",
                   help="also train the logit scale and bias (default: frozen)")
    g.add_argument("--freeze_vision_encoder", action="store_true", help=argparse.SUPPRESS)
    g.add_argument("--reinit_vision_tower", action="store_true",
                   help="start the vision tower from random weights (ablations; the demo uses it)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch_size", type=int, default=32, help="per process")
    g.add_argument("--learning_rate", type=float, default=1e-5)
    g.add_argument("--weight_decay", type=float, default=0.05)
    g.add_argument("--num_epochs", type=int, default=3)
    g.add_argument("--save_epoch_models", action=argparse.BooleanOptionalAction, default=True,
                   help="write OUTPUT_DIR/epoch_N/ after every epoch")
    add_common_args(p)
    p.set_defaults(wandb_project="stage0_vision_encoder")
    return p.parse_args(argv)


def text_length(model, tokenizer, requested: int | None) -> int:
    """The checkpoint fixes its text length (64 for most SigLIPs): never more than its
    position table, and by default exactly it."""
    limit = model.config.text_config.max_position_embeddings
    tok_max = getattr(tokenizer, "model_max_length", None)
    if tok_max and tok_max < limit:
        limit = tok_max
    if requested and requested > limit:
        logger.warning("--max_text_length %d exceeds the checkpoint's %d; using %d", requested, limit, limit)
    return min(requested or limit, limit)


def load_model(model_name, reinit_vision=False):
    model = AutoModel.from_pretrained(model_name, dtype=torch.float32)
    for attr in ("vision_model", "text_model", "logit_scale", "logit_bias"):
        if not hasattr(model, attr):
            raise ValueError(f"{model_name}: {type(model).__name__} is not a SigLIP dual encoder "
                             f"(no .{attr}); Stage0 expects a SiglipModel checkpoint")
    if reinit_vision:
        fresh = SiglipVisionModel(model.config.vision_config)
        model.vision_model.load_state_dict(fresh.state_dict())
        logger.info("vision tower re-initialised from random weights (--reinit_vision_tower)")
    return model


def main(argv=None):
    args = parse_args(argv)
    accelerator = setup_accelerator_and_logging(args, stage="Stage0")
    tokenizer = AutoTokenizer.from_pretrained(args.model_name)
    image_processor = AutoImageProcessor.from_pretrained(args.model_name)
    model = load_model(args.model_name, args.reinit_vision_tower)
    max_len = text_length(model, tokenizer, args.max_text_length)
    kw = dict(image_root=args.image_root, image_processor=image_processor, tokenizer=tokenizer,
              max_length=max_len, image_key=args.image_key, caption_key=args.caption_key)
    train_ds = ImageTextContrastiveDataset(args.train_json, **kw)
    val_ds = ImageTextContrastiveDataset(args.val_json, **kw) if args.val_json else None
    logger.info("train: %d pairs (%d distinct captions)%s; text length %d", len(train_ds),
                len(train_ds.captions), f", val: {len(val_ds)}" if val_ds else "", max_len)
    trainer = VisionEncoderTrainerStage0(args, accelerator, model, tokenizer, image_processor, train_ds, val_ds)
    trainer.train()
    return trainer


if __name__ == "__main__":
    main()
