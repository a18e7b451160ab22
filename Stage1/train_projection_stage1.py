"""Stage 1: train the MLP projector between a frozen SigLIP tower and a frozen Gemma3 LM on
image-caption pairs (causal-LM loss on the caption tokens only).

    accelerate launch --config_file scripts/accelerate/ddp.yaml Stage1/train_projection_stage1.py \\
        --image_root /data/cxr --train_json stage1_train.json --val_json stage1_val.json \\
        --output_dir runs/stage1

Writes OUTPUT_DIR/final_model/ (a LlavaForConditionalGeneration folder that
`AutoModelForImageTextToText.from_pretrained` loads, with `projection_layer/` inside),
OUTPUT_DIR/epoch_N/ (the same, per epoch), resume checkpoints under OUTPUT_DIR/checkpoints/
and metrics in OUTPUT_DIR/metrics.jsonl.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script (accelerate launch Stage1/...): import from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cli
import preflight

DEFAULT_VISION = "StanfordAIMI/XraySigLIP__vit-l-16-siglip-384__webli"
DEFAULT_LLM = "google/gemma-3-1b-it"


def parse_args(argv=None):
    p = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--image_root", required=True, help="image paths in the JSON files are relative to this")
    g.add_argument("--train_json", required=True, help='JSON list of {"image": ..., "caption": ...}')
    g.add_argument("--val_json", default=None, help="same format; caption loss is reported each epoch")
    g.add_argument("--max_caption_len", type=int, default=256, help="caption tokens kept, EOS included")
    g.add_argument("--instruction", default="", help="optional text between the image and the caption")
    g = p.add_argument_group("model")
    g.add_argument("--vision_model_name", default=DEFAULT_VISION,
                   help="SigLIP / DINOv2 / CLIP hub id or folder, or a Stage0 final_model/")
    g.add_argument("--llm_name", default=DEFAULT_LLM, help="Gemma3 causal LM hub id or folder")
    g.add_argument("--projector_depth", type=int, default=2,
                   help="2 = LLaVA's Linear-GELU-Linear (the only depth plain transformers loads)")
    g.add_argument("--pad_to_square", action=argparse.BooleanOptionalAction, default=None,
                   help="zero-pad each image to a square before the resize, as MedSigLIP was trained "
                        "(google/medsiglip-448 from the hub records nothing: pass it); default: as "
                        "--vision_model_name records it (a Stage0 export trained with it pads). Recorded in the export")
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch_size", type=cli.positive_int, default=16, help="per process")
    g.add_argument("--learning_rate", type=cli.positive_float, default=1e-4)
    g.add_argument("--num_epochs", type=cli.positive_int, default=1)
    g.add_argument("--weight_decay", type=float, default=0.0)
    g.add_argument("--save_every_epoch", action=argparse.BooleanOptionalAction, default=True,
                   help="write OUTPUT_DIR/epoch_N/ (a full VLM folder) after every epoch")
    cli.add_common_args(p)
    args = p.parse_args(argv)
    return args


if __name__ == "__main__" and cli.help_requested():
    parse_args()  # the help, without waiting seconds for the imports below

import torch
from torch.utils.data import DataLoader

import data_check
from accelerator_setup import setup_accelerator_and_logging
from image_loader import apply_pad_to_square
from Stage1.dataset import CaptionCollator, ImageCaptionDataset
from Stage1.projector_trainer import ProjectionTrainerStage1
from training.data import LengthGroupedSampler, loader_kwargs
from vlm import build_vlm


def make_dataset(json_path, args, model, tokenizer, image_processor):
    return ImageCaptionDataset(json_path, args.image_root, tokenizer, image_processor,
                               image_token_id=model.config.image_token_index,
                               num_image_tokens=model.config.image_seq_length,
                               max_caption_len=args.max_caption_len, instruction=args.instruction,
                               collect_bad_rows=True)


def make_loader(ds, args, tokenizer, *, shuffle):
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sampler = None
    if shuffle and args.group_by_length:
        sampler = LengthGroupedSampler(ds.lengths(), args.batch_size, seed=args.seed)
    return DataLoader(ds, batch_size=args.batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
                      collate_fn=CaptionCollator(pad), **loader_kwargs(args.num_workers))


def main(argv=None):
    args = parse_args(argv)
    # Before the accelerator, a tracker or a model starts; the dataset checks each row and image.
    preflight.check_data_file(args.train_json, "--train_json")
    if args.val_json:
        preflight.check_data_file(args.val_json, "--val_json")
    # The models and the output folder too, before anything is written there.
    preflight.check_run_start(args, {"--vision_model_name": args.vision_model_name, "--llm_name": args.llm_name})
    accelerator = setup_accelerator_and_logging(args, stage="Stage1")
    # Frozen weights stored in bf16 halve their memory; fp16 storage overflows in Gemma.
    dtype = torch.bfloat16 if args.mixed_precision == "bf16" else None
    model, tokenizer, image_processor = build_vlm(args.vision_model_name, args.llm_name,
                                                  projector_depth=args.projector_depth, torch_dtype=dtype)
    apply_pad_to_square(image_processor, args.pad_to_square, args.vision_model_name)
    train_ds = make_dataset(args.train_json, args, model, tokenizer, image_processor)
    val_ds = make_dataset(args.val_json, args, model, tokenizer, image_processor) if args.val_json else None
    data_check.check_datasets(accelerator, args, train=train_ds, val=val_ds)  # bad rows: stop, or drop them
    train_loader = make_loader(train_ds, args, tokenizer, shuffle=True)
    val_loader = make_loader(val_ds, args, tokenizer, shuffle=False) if val_ds is not None else None
    trainer = ProjectionTrainerStage1(args, accelerator, model, tokenizer, image_processor,
                                      train_loader, val_loader)
    results = trainer.train()
    if accelerator.is_main_process:
        (Path(args.output_dir) / "results.json").write_text(json.dumps(results, indent=2))
    return trainer


if __name__ == "__main__":
    cli.run(main)
