"""Stage 0: contrastive (SigLIP loss) training of an image tower against a text tower.

Seed 000: one pretrained SigLIP; its text tower and logit scale/bias stay frozen by default
and the vision tower learns to place images next to their captions.

    accelerate launch Stage0/train_vision_encoder_stage0.py \\
        --model_name StanfordAIMI/XraySigLIP__vit-l-16-siglip-384__webli \\
        --train_json data/train.json --image_root data/ --output_dir runs/stage0

Seed 003 (knee X-ray): any image backbone against a SigLIP or BERT-style text tower, from a CSV
with a split column, new projection heads and a learnable temperature and bias:

    accelerate launch Stage0/train_vision_encoder_stage0.py --image_model_name microsoft/rad-dino \\
        --text_model_name google/siglip-base-patch16-224 --csv_file knee.csv --image_size 448 \\
        --output_dir runs/knee
"""
from __future__ import annotations

import argparse
import logging
import sys
import warnings
from pathlib import Path

if __package__ in (None, ""):  # `python Stage0/train_vision_encoder_stage0.py` from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cli
import preflight


def parse_args(argv=None):
    p = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("towers (default: one pretrained SigLIP, --model_name)")
    g.add_argument("--model_name", default="StanfordAIMI/XraySigLIP__vit-l-16-siglip-384__webli",
                   help="hub id or local folder of a SigLIP checkpoint (or a Stage0 final_model/)")
    g.add_argument("--image_model_name", default=None,
                   help="replace the image tower: a SigLIP (its vision half) or any Hugging Face image backbone "
                        "AutoModel loads (DINOv2, microsoft/rad-dino); gets a projection head")
    g.add_argument("--text_model_name", default=None,
                   help="replace the text tower: a SigLIP (its text half) or a BERT-style encoder (mean-pooled)")
    g.add_argument("--image_pooling", choices=["cls", "mean"], default="cls",
                   help="non-SigLIP image backbones: the CLS token or the mean of the patch tokens")
    g.add_argument("--projection_dim", type=int, default=None,
                   help="shared embedding width (default: the SigLIP tower's, else the text tower's)")
    g.add_argument("--image_size", type=int, default=None,
                   help="non-SigLIP image towers: resize and crop to this size (RAD-DINO: 224 or 448, not 518)")
    g.add_argument("--pad_to_square", action=argparse.BooleanOptionalAction, default=None,
                   help="zero-pad each image to a square, centred, before the processor's resize, as MedSigLIP's "
                        "own preprocessing does (google/medsiglip-448); recorded in the exported folder, so "
                        "evaluation, inference, the image cache and Stage1/Stage2 pad too without being told "
                        "(default: as --model_name records it, off for hub checkpoints)")
    g.add_argument("--image_model_path", default=None,
                   help="with --image_model_name merlin: a Merlin checkpoint file (the official release, or any "
                        "state dict of the I3ResNet-152)")
    g.add_argument("--text_model_path", default=None,
                   help="the CT seed's text tower: a decoder LLM folder used the LLM2Vec way (or an LLM2Vec MNTP "
                        "adapter folder, merged into its base); a Stage0 output folder resumes that whole model")
    g.add_argument("--volume_size", type=int, nargs=3, default=[160, 224, 224], metavar=("D", "H", "W"),
                   help="3D towers: volumes are resized to this depth, height, width")
    g.add_argument("--volume_clip", type=float, nargs=2, default=[-1000.0, 1000.0], metavar=("MIN", "MAX"),
                   help="3D towers: intensities are clipped to [MIN, MAX] and scaled to [0, 1] (default: HU)")
    g.add_argument("--merlin_layers", type=int, nargs=4, default=None, help=argparse.SUPPRESS)  # small variants
    g.add_argument("--merlin_width", type=int, default=64, help=argparse.SUPPRESS)
    g.add_argument("--temperature", type=float, default=None,
                   help="new heads: initial t = 1/temperature (default: the SigLIP paper's t = 10, b = -10); "
                        "both stay learnable")
    g = p.add_argument_group("data: a JSON list or a CSV")
    g.add_argument("--train_json", "--csv_file", "--data_path", dest="train_json", default=None,
                   help='JSON list of {"image": ..., "caption": ...}, or a CSV (columns img_path, impression, '
                        "and split when it holds several splits)")
    g.add_argument("--val_json", default=None,
                   help="same format; val loss, accuracy and R@1/R@5 each epoch (default with a split column: "
                        "the --val_split rows of the training file)")
    g.add_argument("--image_root", default="", help="folder that relative image paths are under")
    g.add_argument("--image_key", "--img_path_column", dest="image_key", default=None,
                   help="image path column (default: image for JSON, img_path for CSV)")
    g.add_argument("--caption_key", "--findings_column", "--impression_column", dest="caption_key", default=None,
                   help="text column (default: caption for JSON, impression for CSV)")
    g.add_argument("--split_column", default=None,
                   help="column naming each row's split (default for a CSV: split, if it has one)")
    g.add_argument("--validate_csv", action="store_true",
                   help="check every row of --csv_file (columns, files, texts, volumes) and exit: 0 if clean, "
                        "else 1 with one 'line N: reason' per bad row")
    g.add_argument("--create_example_csv", action="store_true",
                   help="write --csv_file (default NPZ_DIRECTORY/example.csv) listing the volumes in --npz_directory")
    g.add_argument("--force", action="store_true",
                   help="with --create_example_csv: replace an existing CSV (its texts become the placeholder)")
    g.add_argument("--npz_directory", default=None)
    g.add_argument("--train_data_dir", default=None, help="legacy directory mode: a folder of NPZ volumes")
    g.add_argument("--val_data_dir", default=None, help="legacy directory mode: validation volumes")
    g.add_argument("--text_reports_path", default=None,
                   help='legacy directory mode: JSON {"<volume file stem>": "report text"}')
    g.add_argument("--label_column", default=None,
                   help="labelled data (seed 004): one or several class labels per row, ';'-separated; the "
                        "texts become the classes' texts and the label-aware losses apply")
    g.add_argument("--classes_file", default=None, help="a CSV condition,description,icd10 for --label_column")
    g.add_argument("--class_prompt_template", default=None,
                   help="each class's text, with {condition} and/or {description} (one wording for every class; "
                        "{description} needs every class described), e.g. \"Chest X-ray showing {condition}.\"; "
                        "default: the seed's \"Clinical presentation of {condition}: {description}\", or \"A "
                        "dermatological image showing {condition}.\" for a class without a description")
    g.add_argument("--unknown_labels", choices=["warn", "error"], default="warn",
                   help="labels missing from --classes_file: warn and keep them as classes of their own, or refuse")
    g.add_argument("--stratified_split", default="0.8,0.1,0.1",
                   help="train,val,test fractions of the multi-label stratified split (data without a split column)")
    g.add_argument("--oversample_min", type=int, default=30,
                   help="repeat rows of classes with fewer training rows than this (train only; 0: off)")
    g.add_argument("--loss", default="multi_positive",
                   help="with --label_column: a comma list of sigmoid, weighted, multi_positive, icd, wasserstein, "
                        "hard_negative: (1-a) L_sigmoid + a L_icd + b L_wasserstein + g L_hard_negative")
    g.add_argument("--pos_weight", type=float, default=1.0, help="weighted: the positive pairs' weight")
    g.add_argument("--alpha", type=float, default=0.3, help="icd: its final weight a (capped at 0.9)")
    g.add_argument("--beta", type=float, default=0.1, help="wasserstein: its final weight b")
    g.add_argument("--gamma", type=float, default=0.1, help="hard_negative: its final weight g")
    g.add_argument("--ramp_steps", default="0,1000,2000,2500",
                   help="steps s0,s1,s2,s3: a ramps over s0..s1, then b over s1..s2, then g over s2..s3")
    g.add_argument("--train_split", default="train")
    g.add_argument("--val_split", default="val")
    g.add_argument("--max_text_length", type=int, default=None,
                   help="default: the text tower's own length for SigLIP (64 for most), 128 for BERT; more "
                        "than the tower's limit is clamped with a warning")
    g.add_argument("--duplicate_captions", choices=["positive", "negative"], default="positive",
                   help="a caption repeated in the batch: a positive for every image that carries it "
                        "(default), or a negative for all but its own row as in the SigLIP paper, whose "
                        "web captions are unique")
    g.add_argument("--text_attention_mask", action="store_true",
                   help="pass the padding mask to a SigLIP text tower (pretrained SigLIP never saw one)")
    g = p.add_argument_group("what trains")
    g.add_argument("--no_freeze_text_encoder", dest="freeze_text_encoder", action="store_false",
                   help="also train the text tower (default: frozen; a new text projection head always trains)")
    g.add_argument("--no_freeze_logit_scale", dest="freeze_logit_scale", action="store_false", default=None,
                   help="also train a pretrained SigLIP's logit scale and bias (new heads' always train)")
    g.add_argument("--freeze_logit_scale", dest="freeze_logit_scale", action="store_true",
                   help="keep the logit scale and bias fixed, new heads too")
    g.add_argument("--lora_r", type=int, default=0,
                   help="LoRA rank on both towers of a pretrained SigLIP (0: full fine-tune); only the adapters train")
    g.add_argument("--lora_alpha", type=float, default=16.0)
    g.add_argument("--lora_dropout", type=float, default=0.05)
    g.add_argument("--lora_target_modules", default="q_proj,k_proj,v_proj,out_proj,fc1,fc2",
                   help="within the encoder layers only (never the vision pooling head)")
    g.add_argument("--text_lora_r", type=int, default=0,
                   help="LoRA rank on a decoder LLM text tower (the CT recipe's phase 2; 0: it trains fully with "
                        "--no_freeze_text_encoder); only its adapters train in the text backbone")
    g.add_argument("--text_lora_alpha", type=float, default=None, help="default: 2 x --text_lora_r, as LLM2Vec")
    g.add_argument("--text_lora_dropout", type=float, default=0.05)
    g.add_argument("--text_lora_target_modules", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")
    g.add_argument("--freeze_vision_encoder", action="store_true", help=argparse.SUPPRESS)
    g.add_argument("--freeze_image_backbone", action="store_true",
                   help="train only the projection heads (and the logit scale/bias) on a frozen image backbone: the "
                        "CT seed's phase 1; phase 2 continues from its output with --model_name PHASE1/final_model")
    g.add_argument("--reinit_vision_tower", action="store_true",
                   help="start the vision tower from random weights (ablations; the demo uses it)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch_size", type=cli.positive_int, default=32, help="per process")
    g.add_argument("--learning_rate", type=cli.positive_float, default=1e-5)
    g.add_argument("--weight_decay", type=float, default=0.05)
    g.add_argument("--num_epochs", "--epochs", dest="num_epochs", type=cli.positive_int, default=3)
    g.add_argument("--save_epoch_models", action=argparse.BooleanOptionalAction, default=True,
                   help="write OUTPUT_DIR/epoch_N/ after every epoch")
    cli.add_common_args(p)
    p.set_defaults(wandb_project="stage0_vision_encoder")
    tools = argparse.ArgumentParser(add_help=False)
    for flag in ("--validate_csv", "--create_example_csv"):
        tools.add_argument(flag, action="store_true")
    known, _ = tools.parse_known_args(argv)
    if known.validate_csv or known.create_example_csv:  # the seed runs these with no other flag
        for a in p._actions:
            a.required = False
        args = p.parse_args(argv)
        raise SystemExit(run_csv_tool(args))
    args = p.parse_args(argv)
    if not args.train_json and not args.train_data_dir:
        p.error("pass the data: --train_json / --csv_file (or --train_data_dir for directory mode)")
    if args.class_prompt_template is not None:
        from Stage0.labels import check_template
        try:
            check_template(args.class_prompt_template)
        except ValueError as e:
            p.error(str(e))
    if args.pad_to_square and (args.image_model_name == "merlin" or args.train_data_dir):
        p.error("--pad_to_square pads 2D images; the 3D tower reads CT volumes, which are resized by --volume_size: "
                "drop --pad_to_square")
    if args.temperature is not None:
        if args.temperature <= 0:
            p.error("--temperature must be > 0")
        if args.temperature < 0.1:
            warnings.warn(f"--temperature {args.temperature:g} is a softmax (CLIP) value; in the sigmoid loss it "
                          f"sets the initial t = {1 / args.temperature:.1f} next to a bias b = -10, and both are "
                          "learnt. The SigLIP paper starts at t = 10 (--temperature 0.1, the default).")
    return args


if __name__ == "__main__" and cli.help_requested():
    parse_args()  # the help, without waiting seconds for the imports below

import data_check
from accelerator_setup import setup_accelerator_and_logging
from Stage0.dataset import ImageTextContrastiveDataset
from Stage0.towers import build_model, text_length
from Stage0.trainer import VisionEncoderTrainerStage0

logger = logging.getLogger("siglip_med")


def check_data(args) -> None:
    """The data files exist and hold rows (of the train and val splits), checked before the
    accelerator, a tracker or a model starts. The datasets check each row and image."""
    if args.train_data_dir:  # directory mode: its CSV is written once the output folder is checked
        return
    flag = "--train_json/--csv_file"
    if args.label_column:  # no split column: a stratified split is made (Stage0/labels.py)
        preflight.check_data_file(args.train_json, flag)
        return
    split_column = args.split_column
    if split_column is None and str(args.train_json).lower().endswith(".csv"):
        from data_rows import csv_columns
        split_column = "split" if "split" in csv_columns(args.train_json) else None
    preflight.check_data_file(args.train_json, flag, split_column=split_column,
                              split=args.train_split if split_column else None, split_flag="--train_split")
    if args.val_json:
        preflight.check_data_file(args.val_json, "--val_json", split_column=args.split_column,
                                  split=args.val_split if args.split_column else None, split_flag="--val_split")
    elif split_column:
        preflight.check_data_file(args.train_json, flag, split_column=split_column, split=args.val_split,
                                  split_flag="--val_split")


def model_flags(args) -> dict:
    """{flag: name} of the models build_model will load from these flags (Stage0/towers.py)."""
    from Stage0.towers import TOWERS_FILE
    image, text, text_path = args.image_model_name, args.text_model_name, args.text_model_path
    if text_path and (Path(text_path) / TOWERS_FILE).is_file():  # a phase-1 output: the whole model resumes
        return {"--text_model_path": text_path}
    flags = {"--image_model_name": image if image != "merlin" else None, "--text_model_name": text,
             "--text_model_path": text_path}
    if not image or not (text or text_path):  # the SigLIP gives the tower(s) not named otherwise
        flags["--model_name"] = args.model_name
    return flags


def run_csv_tool(args) -> int:
    """--validate_csv / --create_example_csv (seed 002's CSV tools)."""
    from Stage0.data_tools import create_example_csv, validate_csv
    if args.create_example_csv:
        if not args.npz_directory:
            print("error: --create_example_csv needs --npz_directory", file=sys.stderr)
            return 2
        out = create_example_csv(args.npz_directory, args.train_json, force=args.force)
        print(f"wrote {out}")
        if not args.validate_csv:
            return 0
        args.train_json = str(out)
    if not args.train_json:
        print("error: --validate_csv needs --csv_file", file=sys.stderr)
        return 2
    return validate_csv(args.train_json, args.image_root, args.image_key, args.caption_key, args.split_column)


def main(argv=None):
    args = parse_args(argv)
    check_data(args)
    preflight.check_run_start(args, model_flags(args))  # before the output folder or args.json is written
    preflight.require_file(args.image_model_path, "--image_model_path", "checkpoint file")
    if args.train_data_dir:  # the CT seed's legacy directory mode becomes a CSV
        args.train_json = str(Path(args.output_dir) / "data_from_dirs.csv")
    accelerator = setup_accelerator_and_logging(args, stage="Stage0")
    if args.train_data_dir:  # written once, after the output folder was checked, then read by all
        from Stage0.data_tools import csv_from_directories
        if accelerator.is_main_process:
            csv_from_directories(args.train_data_dir, args.val_data_dir, args.text_reports_path, args.train_json)
        accelerator.wait_for_everyone()
    model, tokenizer, image_processor = build_model(args)
    apply_pad_to_square(args, model, image_processor)
    if args.freeze_logit_scale is None:  # a pretrained pair keeps its own; new heads learn theirs
        args.freeze_logit_scale = model.siglip is not None
    if args.reinit_vision_tower:
        reinit_image_backbone(model)
    if args.lora_r:
        from Stage0.towers import apply_lora
        apply_lora(model, args.model_name, r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout,
                   target_modules=args.lora_target_modules)
        args.freeze_text_encoder = False  # the text adapters train: the text is embedded every step
    if args.text_lora_r:
        from Stage0.towers import TEXT_DIR, TOWERS_FILE, apply_text_lora
        text_source = args.text_model_path or args.text_model_name  # None once build_model loaded a towers folder
        if not text_source and (Path(args.model_name) / TOWERS_FILE).is_file():
            text_source = Path(args.model_name) / TEXT_DIR
        apply_text_lora(model, text_source,
                        r=args.text_lora_r, alpha=args.text_lora_alpha, dropout=args.text_lora_dropout,
                        target_modules=args.text_lora_target_modules)
        args.freeze_text_encoder = False
    max_len = text_length(model.text, tokenizer, args.max_text_length)
    objective = class_prompts = None
    label_kw = {}
    if args.label_column:
        from losses import LabelAwareObjective
        from Stage0.labels import class_texts, collision_error, colliding_prompts, prepare_labelled_csv, prompt_record
        image_key = args.image_key or ("img_path" if str(args.train_json).lower().endswith(".csv") else "image")
        label_problems = []
        out_csv, class_names, classes = prepare_labelled_csv(
            args.train_json, args.image_root, image_key, args.label_column, args.classes_file,
            Path(args.output_dir) / "labelled_data.csv", split_column=args.split_column or "split",
            fractions=tuple(float(v) for v in args.stratified_split.split(",")), oversample_min=args.oversample_min,
            seed=args.seed, write=accelerator.is_main_process, problems=label_problems,
            template=args.class_prompt_template, unknown_labels=args.unknown_labels)
        accelerator.wait_for_everyone()  # the file exists for every process before it is read
        args.train_json, args.image_key, args.caption_key, args.split_column = str(out_csv), "img_path", "caption", "split"
        args.image_root = ""
        objective = LabelAwareObjective(
            [v.strip() for v in args.loss.split(",") if v.strip()], pos_weight=args.pos_weight, alpha=args.alpha,
            beta=args.beta, gamma=args.gamma, ramp_steps=[int(v) for v in args.ramp_steps.split(",")],
            class_codes=[classes.get(c, {}).get("icd10") or "" for c in class_names])
        class_prompts = model.text.tokenize(tokenizer, class_texts(class_names, classes, args.class_prompt_template),
                                            max_len)
        collisions = colliding_prompts(class_names, *class_prompts)
        if collisions:
            raise SystemExit(collision_error(collisions, max_len))
        prompts_used = prompt_record(args.class_prompt_template, class_names, classes)
        label_kw = {"label_column": "labels", "class_names": class_names}
    split_column = args.split_column
    if split_column is None and str(args.train_json).lower().endswith(".csv"):
        from data_rows import csv_columns
        split_column = "split" if "split" in csv_columns(args.train_json) else None
    kw = dict(image_root=args.image_root, image_processor=image_processor, tokenizer=tokenizer,
              max_length=max_len, image_key=args.image_key, caption_key=args.caption_key,
              tokenize=lambda texts, n: model.text.tokenize(tokenizer, texts, n), collect_bad_rows=True, **label_kw)
    train_ds = ImageTextContrastiveDataset(args.train_json, split_column=split_column,
                                           split=args.train_split if split_column else None, **kw)
    if args.val_json:
        val_ds = ImageTextContrastiveDataset(args.val_json, split_column=args.split_column,
                                             split=args.val_split if args.split_column else None, **kw)
    elif split_column:
        val_ds = ImageTextContrastiveDataset(args.train_json, split_column=split_column, split=args.val_split, **kw)
    else:
        val_ds = None
    if args.label_column:  # rows of the user's labelled file left out while it was prepared
        train_ds.bad_rows += label_problems
    data_check.check_datasets(accelerator, args, train=train_ds, val=val_ds)  # bad rows: stop, or drop them
    logger.info("train: %d pairs (%d distinct captions)%s; text length %d", len(train_ds),
                len(train_ds.captions), f", val: {len(val_ds)}" if val_ds else "", max_len)
    trainer = VisionEncoderTrainerStage0(args, accelerator, model, tokenizer, image_processor, train_ds, val_ds,
                                         objective=objective, class_prompts=class_prompts,
                                         prompt_record=prompts_used if args.label_column else None)
    trainer.train()
    return trainer


def apply_pad_to_square(args, model, image_processor) -> None:
    """--pad_to_square / --no-pad_to_square on the image processor (image_loader.apply_pad_to_square);
    the 3D tower has no image to pad."""
    import image_loader
    if args.pad_to_square and model.image.kind == "merlin":
        raise cli.UserError("--pad_to_square pads 2D images; this model's image tower reads CT volumes: drop "
                            "--pad_to_square")
    image_loader.apply_pad_to_square(image_processor, args.pad_to_square, args.model_name)


def reinit_image_backbone(model):
    """Random weights for the image backbone (ablations; the demo's fine-tune starts there)."""
    backbone = model.image.backbone
    fresh = type(backbone)(backbone.config)
    backbone.load_state_dict(fresh.state_dict())
    logger.info("vision tower re-initialised from random weights (--reinit_vision_tower)")


if __name__ == "__main__":
    cli.run(main)
