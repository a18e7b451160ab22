"""Stage 2: VQA instruction tuning of the SigLIP + MLP projector + Gemma3 VLM on
(image, question, answer) triplets; the loss is on the answer tokens only.

    accelerate launch --config_file scripts/accelerate/ddp.yaml Stage2/train_vqa_stage2.py \\
        --image_root /data/cxr --train_json stage2_train.json --val_json stage2_val.json \\
        --stage1_projector_path runs/stage1/final_model --output_dir runs/stage2

or from a Gemma 3 multimodal checkpoint as it ships (MedGemma, Gemma 3 4B+), with no Stage 1:

    accelerate launch --config_file scripts/accelerate/ddp.yaml Stage2/train_vqa_stage2.py \\
        --image_root /data/cxr --train_json stage2_train.json --val_json stage2_val.json \\
        --base_vlm google/medgemma-4b-it --lora_r 16 --lora_target_modules all-linear \\
        --gradient_checkpointing --mixed_precision bf16 --output_dir runs/medgemma

By default the LM trains and the projector and vision tower stay frozen. Writes
OUTPUT_DIR/final_model/ and OUTPUT_DIR/epoch_N/: the VLM in Hugging Face format
(`AutoModelForImageTextToText.from_pretrained` loads it; LoRA merged), `language_model/`,
`projection_layer/` (and `vision_tower/` with --train_ve_first_epoch, `lora_adapter/` with
--lora_r); with --base_vlm, final_model/ is the fine-tuned checkpoint in its own class with its
processor (and `lora_adapter/`). Resume checkpoints under OUTPUT_DIR/checkpoints/, metrics in OUTPUT_DIR/metrics.jsonl and the
val losses in OUTPUT_DIR/results.json.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from pathlib import Path

if __package__ in (None, ""):  # run as a script (accelerate launch Stage2/...): import from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cli
import preflight

DEFAULT_VISION = "StanfordAIMI/XraySigLIP__vit-l-16-siglip-384__webli"
DEFAULT_LLM = "google/gemma-3-1b-it"
DEFAULT_LORA_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


def add_bool(group, name, default, help):
    """--name / --no-name (BooleanOptionalAction), and --no_name as the seed spells it."""
    group.add_argument(f"--{name}", action=argparse.BooleanOptionalAction, default=default,
                       help=f"{help} (off: --no_{name})")
    group.add_argument(f"--no_{name}", dest=name, action="store_false", help=argparse.SUPPRESS)


def parse_args(argv=None):
    p = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--image_root", required=True, help="image paths in the JSON files are relative to this")
    g.add_argument("--train_json", required=True,
                   help='JSON list of {"image": ..., "problem": question, "normal_caption": answer}')
    g.add_argument("--val_json", default=None, help="same format; answer loss is reported each epoch")
    g.add_argument("--max_q_len", type=int, default=128, help="question tokens kept (the image and turn "
                   "markers are never cut)")
    g.add_argument("--max_a_len", type=int, default=256, help="answer tokens kept, <end_of_turn> included")
    g = p.add_argument_group("model")
    g.add_argument("--vision_model_name", default=None,
                   help="the vision tower Stage 1 used: SigLIP hub id or folder, or a Stage0 final_model/ "
                        f"(default: the one Stage 1 recorded, else {DEFAULT_VISION}); another tower than "
                        "Stage 1's is refused")
    g.add_argument("--allow_vision_tower_mismatch", action="store_true",
                   help="pair the Stage 1 projector with a different tower than it was trained on")
    g.add_argument("--llm_name", default=DEFAULT_LLM, help="the Gemma3 causal LM Stage 1 used (hub id or folder)")
    g.add_argument("--stage1_projector_path", default=None,
                   help="Stage 1 output: its final_model/ (a VLM folder) or that folder's projection_layer/")
    g.add_argument("--pad_to_square", action=argparse.BooleanOptionalAction, default=None,
                   help="zero-pad each image to a square before the resize (MedSigLIP's preprocessing); default: as "
                        "Stage 1 recorded it, else as --vision_model_name records it")
    g.add_argument("--projector_depth", type=int, default=2,
                   help="only without --stage1_projector_path (a new projector); otherwise Stage 1's depth")
    g.add_argument("--base_vlm", default=None,
                   help="start from this Gemma3ForConditionalGeneration checkpoint instead (hub id or folder: "
                        "google/medgemma-4b-it, google/gemma-3-4b-it, ...): its own tower, projector, processor and "
                        "chat template; no Stage 1, so no --stage1_projector_path/--vision_model_name/--llm_name")
    g.add_argument("--load_in_4bit", action="store_true",
                   help="with --base_vlm and --lora_r: QLoRA, the frozen weights in bitsandbytes NF4 (double "
                        "quantisation, bf16 compute); needs a CUDA GPU and bitsandbytes")
    g.add_argument("--pan_and_scan", action="store_true",
                   help="with --base_vlm: the processor adds crops of wide or tall images (more image tokens); "
                        "off by default, as in the checkpoint's processor")
    g = p.add_argument_group("what trains")
    add_bool(g, "unfreeze_llm", True, "fine-tune the LM (fully, or its LoRA adapters with --lora_r > 0)")
    add_bool(g, "unfreeze_projection_layer", False, "fine-tune the projector")
    add_bool(g, "train_ve_first_epoch", False,
             "train the vision tower during epoch 1 only, then freeze it (CheXagent)")
    g.add_argument("--lora_r", type=int, default=0, help="LoRA rank on the LM's linear layers; 0 = full fine-tune")
    g.add_argument("--lora_alpha", type=float, default=16.0)
    g.add_argument("--lora_dropout", type=float, default=0.05)
    g.add_argument("--lora_target_modules", default=DEFAULT_LORA_TARGETS,
                   help="comma-separated module names inside the LM (never the vision tower), or all-linear: "
                        "every linear layer of the LM (Google's MedGemma recipe)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch_size", type=cli.positive_int, default=8, help="per process")
    g.add_argument("--learning_rate", type=cli.positive_float, default=2e-5)
    g.add_argument("--num_epochs", type=cli.positive_int, default=3)
    g.add_argument("--weight_decay", type=float, default=0.0, help="not applied to norms and biases")
    add_bool(g, "save_every_epoch", True, "write OUTPUT_DIR/epoch_N/ (a full export) after every epoch")
    cli.add_common_args(p)
    p.set_defaults(wandb_project="stage2_vqa_training")
    args = p.parse_args(argv)
    if args.max_a_len < 2 or args.max_q_len < 1:
        p.error("--max_a_len must be >= 2 (an answer token plus <end_of_turn>) and --max_q_len >= 1")
    if args.lora_r < 0:
        p.error("--lora_r must be >= 0")
    if args.lora_r and not args.unfreeze_llm:
        p.error("--lora_r trains LoRA adapters on the LM; it contradicts --no_unfreeze_llm")
    if args.base_vlm:
        given = [f for f, v, d in (("--stage1_projector_path", args.stage1_projector_path, None),
                                   ("--vision_model_name", args.vision_model_name, None),
                                   ("--llm_name", args.llm_name, DEFAULT_LLM),
                                   ("--projector_depth", args.projector_depth, 2),
                                   ("--pad_to_square", args.pad_to_square, None)) if v != d]
        if given:
            p.error(f"--base_vlm {args.base_vlm} brings its own vision tower, projector and LM; leave out "
                    + ", ".join(given))
    else:
        for flag in ("load_in_4bit", "pan_and_scan"):
            if getattr(args, flag):
                p.error(f"--{flag} applies to a --base_vlm checkpoint; pass --base_vlm, or leave it out")
    if args.load_in_4bit and not args.lora_r:
        p.error("--load_in_4bit freezes the weights in 4 bits; train LoRA adapters on them with --lora_r (e.g. 16)")
    return args


if __name__ == "__main__" and cli.help_requested():
    parse_args()  # the help, without waiting seconds for the imports below

from torch.utils.data import DataLoader

import data_check
from accelerator_setup import setup_accelerator_and_logging
from projectors import PROJECTOR_DIR, check_tower, load_projector, projector_of, recorded_tower
from Stage2.dataset import VQACollator, VQADataset, pad_token_id
from Stage2.trainer import VQATrainerStage2
from training.data import LengthGroupedSampler, loader_kwargs
from image_loader import apply_pad_to_square
from vision_tower import transformers_errors_only
from vlm import build_vlm

logger = logging.getLogger("siglip_med")


# ---------------------------------------------------------------- Stage 1 hand-off

def stage1_projector_dir(path) -> Path:
    path = Path(path)
    pdir = path / PROJECTOR_DIR if (path / PROJECTOR_DIR).is_dir() else path
    if not (pdir / "config.json").is_file():
        raise FileNotFoundError(f"--stage1_projector_path {path}: expected a Stage 1 final_model/ (holding "
                                f"{PROJECTOR_DIR}/) or a {PROJECTOR_DIR}/ folder with config.json; found neither")
    return pdir


def stage1_pads_to_square(path) -> bool | None:
    """Whether Stage 1 padded its images to a square (the record its export's image processor
    carries); None when its folder holds no processor."""
    from image_loader import PAD_TO_SQUARE_KEY
    config = stage1_projector_dir(path).parent / "preprocessor_config.json"
    if not config.is_file():
        return None
    return bool(json.loads(config.read_text()).get(PAD_TO_SQUARE_KEY, False))


def stage1_projector_depth(path) -> int:
    return int(json.loads((stage1_projector_dir(path) / "config.json").read_text())["depth"])


def load_stage1_projector(model, path, args) -> None:
    """Copy Stage 1's projector into `model`, after checking it fits: a projector trained on
    another tower or LM would load nothing sensible, and a bare shape error would not say why."""
    pdir = stage1_projector_dir(path)
    proj = load_projector(pdir)
    vision_dim = model.config.vision_config.hidden_size
    text_dim = model.config.text_config.hidden_size
    target = projector_of(model).state_dict()
    problems = []
    if proj.in_dim != vision_dim:
        problems.append(f"it takes {proj.in_dim}-d vision features, but --vision_model_name "
                        f"{args.vision_model_name} gives {vision_dim}-d")
    if proj.out_dim != text_dim:
        problems.append(f"it outputs {proj.out_dim}-d embeddings, but --llm_name {args.llm_name} "
                        f"takes {text_dim}-d")
    got = proj.state_dict()
    for k in sorted(set(got) | set(target)):
        if k not in got or k not in target:
            problems.append(f"{k}: only in the {'Stage 1 projector' if k in got else 'model'}")
        elif got[k].shape != target[k].shape:
            problems.append(f"{k}: Stage 1 {tuple(got[k].shape)} vs model {tuple(target[k].shape)}")
    if problems:
        raise ValueError(f"the Stage 1 projector in {pdir} does not fit this model:\n  - " + "\n  - ".join(problems)
                         + "\nPass the --vision_model_name and --llm_name that Stage 1 was trained with.")
    projector_of(model).load_state_dict(got, strict=True)
    vlm_config = pdir.parent / "config.json"
    if pdir.name == PROJECTOR_DIR and vlm_config.is_file():
        stage1 = json.loads(vlm_config.read_text())
        if stage1.get("image_seq_length") not in (None, model.config.image_seq_length):
            warnings.warn(f"Stage 1 used {stage1['image_seq_length']} image tokens per image, this run "
                          f"{model.config.image_seq_length}: the image size differs from Stage 1's")
    logger.info("loaded the Stage 1 projector from %s (%d -> %d, depth %d)", pdir, proj.in_dim, proj.out_dim,
                proj.depth)


# ---------------------------------------------------------------- entry point

def make_dataset(json_path, args, model, tokenizer, image_processor, processor=None):
    return VQADataset(json_path, args.image_root, tokenizer, image_processor, model.config,
                      max_q_len=args.max_q_len, max_a_len=args.max_a_len, collect_bad_rows=True, processor=processor)


def make_loader(ds, args, tokenizer, *, shuffle):
    sampler = None
    if shuffle and args.group_by_length:
        sampler = LengthGroupedSampler(ds.lengths(), args.batch_size, seed=args.seed)
    return DataLoader(ds, batch_size=args.batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
                      collate_fn=VQACollator(pad_token_id(tokenizer)), **loader_kwargs(args.num_workers))


def main(argv=None):
    args = parse_args(argv)
    # Before the accelerator, a tracker or a model starts; the dataset checks each row and image.
    preflight.check_data_file(args.train_json, "--train_json")
    if args.val_json:
        preflight.check_data_file(args.val_json, "--val_json")
    if args.base_vlm:
        return main_base_vlm(args)
    if args.stage1_projector_path:
        preflight.require_checkpoint(args.stage1_projector_path, "--stage1_projector_path",
                                     {"stage1", "stage2", "projector"}, f"a Stage1 export (or its {PROJECTOR_DIR}/)",
                                     "pass Stage1's output folder, e.g. runs/stage1/final_model")
    # The models and the output folder too, before anything is written there; the vision tower
    # as main resolves it below (the flag, else the one Stage 1 recorded, else the default).
    vision = args.vision_model_name or (
        (recorded_tower(stage1_projector_dir(args.stage1_projector_path)) or {}).get("source")
        if args.stage1_projector_path else None) or DEFAULT_VISION
    preflight.check_run_start(args, {"--vision_model_name": vision, "--llm_name": args.llm_name})
    accelerator = setup_accelerator_and_logging(args, stage="Stage2")
    depth = stage1_projector_depth(args.stage1_projector_path) if args.stage1_projector_path else args.projector_depth
    record = recorded_tower(stage1_projector_dir(args.stage1_projector_path)) if args.stage1_projector_path else None
    if args.vision_model_name is None:
        args.vision_model_name = (record or {}).get("source") or DEFAULT_VISION
        logger.info("vision tower: %s (%s)", args.vision_model_name,
                    "recorded by Stage 1" if record and record.get("source") else "default")
    model, tokenizer, image_processor = build_vlm(args.vision_model_name, args.llm_name, projector_depth=depth)
    if args.stage1_projector_path:
        check_tower(model, record, args.vision_model_name, what=f"the Stage 1 projector {args.stage1_projector_path}",
                    override_flag="--allow_vision_tower_mismatch", allow=args.allow_vision_tower_mismatch)
        load_stage1_projector(model, args.stage1_projector_path, args)
    pad = args.pad_to_square
    if pad is None and args.stage1_projector_path:  # the projector learnt on what Stage 1 fed the tower
        pad = stage1_pads_to_square(args.stage1_projector_path)
    apply_pad_to_square(image_processor, pad, "Stage 1" if args.pad_to_square is None and pad else args.vision_model_name)
    if not args.stage1_projector_path:
        warnings.warn("no --stage1_projector_path: the projector starts from random weights "
                      "(Stage 2 normally follows Stage 1's alignment)")
    start_projector = {k: v.detach().clone() for k, v in projector_of(model).state_dict().items()}

    def base_loader():
        """This run's starting VLM again, on CPU in the checkpoints' dtypes (for the export)."""
        with transformers_errors_only():
            base, _, _ = build_vlm(args.vision_model_name, args.llm_name, projector_depth=depth)
        projector_of(base).load_state_dict(start_projector)
        return base
    train_ds = make_dataset(args.train_json, args, model, tokenizer, image_processor)
    val_ds = make_dataset(args.val_json, args, model, tokenizer, image_processor) if args.val_json else None
    data_check.check_datasets(accelerator, args, train=train_ds, val=val_ds)  # bad rows: stop, or drop them
    train_loader = make_loader(train_ds, args, tokenizer, shuffle=True)
    val_loader = make_loader(val_ds, args, tokenizer, shuffle=False) if val_ds is not None else None
    trainer = VQATrainerStage2(args, accelerator, model, tokenizer, image_processor, train_loader, val_loader,
                               base_loader=base_loader)
    return train_and_record(args, accelerator, trainer)


def train_and_record(args, accelerator, trainer):
    results = trainer.train()
    if accelerator.is_main_process:
        (Path(args.output_dir) / "results.json").write_text(json.dumps(results, indent=2))
    return trainer


def main_base_vlm(args):
    """Stage 2 from a Gemma 3 multimodal checkpoint as it ships: its own processor makes every
    sample; the same trainer, loop, flags, checkpoints and export folder as the seed's path."""
    from base_vlm import check_4bit, load_base_vlm
    if args.load_in_4bit:
        check_4bit()
    preflight.check_run_start(args, {"--base_vlm": args.base_vlm})
    accelerator = setup_accelerator_and_logging(args, stage="Stage2")
    model, processor = load_base_vlm(args.base_vlm, load_in_4bit=args.load_in_4bit,
                                     pan_and_scan=True if args.pan_and_scan else None)
    tokenizer, image_processor = processor.tokenizer, processor.image_processor

    def base_loader():
        """The checkpoint again, on CPU in its stored dtype (the export merges into it)."""
        with transformers_errors_only():
            return load_base_vlm(args.base_vlm)[0]
    train_ds = make_dataset(args.train_json, args, model, tokenizer, image_processor, processor)
    val_ds = make_dataset(args.val_json, args, model, tokenizer, image_processor, processor) if args.val_json else None
    data_check.check_datasets(accelerator, args, train=train_ds, val=val_ds)
    train_loader = make_loader(train_ds, args, tokenizer, shuffle=True)
    val_loader = make_loader(val_ds, args, tokenizer, shuffle=False) if val_ds is not None else None
    trainer = VQATrainerStage2(args, accelerator, model, tokenizer, image_processor, train_loader, val_loader,
                               base_loader=base_loader, processor=processor)
    return train_and_record(args, accelerator, trainer)


if __name__ == "__main__":
    cli.run(main)
