"""Answer one question about one X-ray (PNG, JPEG or DICOM) with a Stage 2 model.

    python Stage2/inference_vqa_stage2.py --model_path runs/stage2/final_model \\
        --image_path cxr.dcm --question "Is there a pleural effusion?"

or with the seed's triple, reassembled into the same VLM:

    python Stage2/inference_vqa_stage2.py \\
        --llm_path runs/stage2/final_model/language_model \\
        --projector_path runs/stage2/final_model/projection_layer \\
        --vision_model_name StanfordAIMI/XraySigLIP__vit-l-16-siglip-384__webli \\
        --image_path cxr.png --question "Describe the findings." --num_beams 3

A --base_vlm export, or the Gemma 3 multimodal checkpoint it started from (a folder or a hub
id, e.g. google/medgemma-4b-it: the zero-shot baseline), is a --model_path too; its own
processor and chat template make the prompt.

The answer is the last line of standard output (logs and progress go to standard error);
--json prints one JSON object instead. Greedy by default; beam search with --num_beams > 1;
sampling with --do_sample (--temperature > 0, --top_p, --seed).
"""
from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cli
import preflight
from cli import DEFAULT_MAX_NEW_TOKENS

DEFAULT_VISION = "StanfordAIMI/XraySigLIP__vit-l-16-siglip-384__webli"


def parse_args(argv=None):
    p = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model (either --model_path, or --llm_path + --projector_path)")
    g.add_argument("--model_path", default=None, help="an exported Stage 2 folder, e.g. runs/stage2/final_model, or a "
                   "Gemma 3 multimodal checkpoint (folder or hub id, e.g. google/medgemma-4b-it)")
    g.add_argument("--llm_path", default=None, help="Stage 2's final_model/language_model")
    g.add_argument("--projector_path", default=None, help="Stage 2's final_model/projection_layer")
    g.add_argument("--vision_model_name", default=None,
                   help=f"vision tower for the triple (default: the one the projector recorded, else a "
                        f"vision_tower/ next to --llm_path, else {DEFAULT_VISION}); another tower than the "
                        "projector's is refused")
    g.add_argument("--allow_vision_tower_mismatch", action="store_true",
                   help="pair --projector_path with a different tower than it was trained on")
    g = p.add_argument_group("input")
    g.add_argument("--image_path", required=True, help="PNG, JPEG or DICOM")
    g.add_argument("--question", required=True)
    g.add_argument("--max_q_len", type=int, default=None, help="truncate the question as in training")
    g = p.add_argument_group("generation")
    g.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda if available)")
    g.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="auto: bf16 on a GPU that supports it, else fp32")
    g.add_argument("--max_new_tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS)
    g.add_argument("--num_beams", type=int, default=1, help="> 1: beam search")
    g.add_argument("--do_sample", action="store_true", help="sample instead of greedy/beam decoding")
    g.add_argument("--temperature", type=float, default=1.0, help="with --do_sample; must be > 0")
    g.add_argument("--top_p", type=float, default=1.0, help="with --do_sample: nucleus sampling")
    g.add_argument("--seed", type=int, default=0, help="with --do_sample: makes sampling repeatable")
    g.add_argument("--json", action="store_true", help="print one JSON object instead of the bare answer")
    args = p.parse_args(argv)
    if not args.model_path and not (args.llm_path and args.projector_path):
        p.error("pass --model_path, or both --llm_path and --projector_path")
    if args.model_path and (args.llm_path or args.projector_path):
        p.error("--model_path and --llm_path/--projector_path are alternatives; pass one")
    if args.num_beams < 1 or args.max_new_tokens < 1:
        p.error("--num_beams and --max_new_tokens must be >= 1")
    if args.do_sample and args.temperature <= 0:
        p.error("--do_sample needs --temperature > 0")
    if not 0 < args.top_p <= 1:
        p.error("--top_p must be in (0, 1]")
    if not args.question.strip():
        p.error("--question is empty; pass the question to ask, e.g. --question \"Is there a pleural effusion?\"")
    args.device = cli.check_device(p, args.device)
    return p, args


if __name__ == "__main__" and cli.help_requested():
    parse_args()  # the help, without waiting seconds for the imports below

import torch

from base_vlm import encode_prompt, is_base_vlm_config, is_base_vlm_folder, load_base_vlm
from image_loader import ImageLoadError, load_image, prepare_image
from projectors import PROJECTOR_DIR, check_tower, load_projector, projector_of, recorded_tower
from Stage2.dataset import VQACollator, build_prompt, chat_token_ids, pad_token_id
from Stage2.trainer import VISION_TOWER_DIR
from vlm import build_vlm, load_vlm

logger = logging.getLogger("siglip_med")


# ---------------------------------------------------------------- loading

def resolve_dtype(name: str, device: str):
    if name == "auto":
        # bf16 halves memory on GPUs that have it; fp16 overflows in Gemma, CPU stays fp32.
        cuda_bf16 = device.startswith("cuda") and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def load_model(model_path=None, *, llm_path=None, projector_path=None, vision_model_name=None,
               device="cpu", dtype=torch.float32, allow_vision_tower_mismatch=False):
    """(model, tokenizer, image_processor, description) from an exported folder, or reassembled
    from the LM folder, the projector and the vision tower. A missing folder raises
    FileNotFoundError, a folder of another kind (a Stage0 model, no model) cli.UserError, each
    naming the flag and what the folder holds. For a Gemma 3 multimodal model (a --base_vlm
    export or checkpoint, folder or hub id) `image_processor` is its whole processor."""
    if model_path and not Path(model_path).exists() and not Path(model_path).is_absolute():
        preflight.require_model(model_path, "--model_path")  # a hub id: a base checkpoint itself
        model, processor = load_base_vlm(model_path, dtype=dtype, flag="--model_path")
        model.to(device).eval()
        return model, processor.tokenizer, processor, {"model_path": str(model_path)}
    if model_path and is_base_vlm_folder(model_path):
        preflight.require_checkpoint(model_path, "--model_path", {"vlm"}, "a Gemma 3 multimodal model", "")
        model, processor = load_base_vlm(model_path, dtype=dtype, flag="--model_path")
        model.to(device).eval()
        return model, processor.tokenizer, processor, {"model_path": str(model_path)}
    if model_path:
        path = Path(model_path)
        preflight.require_checkpoint(path, "--model_path", {"stage1", "stage2"}, "a Stage2 export (the VQA model)",
                                     "pass a Stage2 output folder such as runs/stage2/final_model")
        model, tokenizer, image_processor = load_vlm(path, torch_dtype=dtype)
        source = {"model_path": str(path)}
    else:
        if not (llm_path and projector_path):
            raise ValueError("pass --model_path, or --llm_path and --projector_path (with --vision_model_name)")
        llm, proj = Path(llm_path), Path(projector_path)
        preflight.require_checkpoint(llm, "--llm_path", {"lm", "encoder", "vlm"}, "a language model",
                                     "pass a Stage2 output's language_model/ folder")
        preflight.require_checkpoint(proj, "--projector_path", {"projector", "stage1", "stage2"},
                                     f"a {PROJECTOR_DIR}/ folder or a Stage1/Stage2 export",
                                     f"pass a Stage2 output's {PROJECTOR_DIR}/ folder")
        pdir = proj / PROJECTOR_DIR if (proj / PROJECTOR_DIR).is_dir() else proj
        record = recorded_tower(pdir)
        if vision_model_name is None:
            trained_tower = llm.parent / VISION_TOWER_DIR
            vision_model_name = ((record or {}).get("source")
                                 or (str(trained_tower) if trained_tower.is_dir() else DEFAULT_VISION))
        preflight.require_model(vision_model_name, "--vision_model_name")
        projector = load_projector(pdir)
        model, tokenizer, image_processor = build_vlm(vision_model_name, llm, projector_depth=projector.depth)
        check_tower(model, record, vision_model_name, what=f"--projector_path {pdir}",
                    override_flag="--allow_vision_tower_mismatch", allow=allow_vision_tower_mismatch)
        projector_of(model).load_state_dict(projector.state_dict(), strict=True)
        model.to(dtype)
        source = {"llm_path": str(llm), "projector_path": str(pdir), "vision_model_name": str(vision_model_name)}
    model.to(device).eval()
    return model, tokenizer, image_processor, source


# ---------------------------------------------------------------- generation

def generation_kwargs(tokenizer, *, max_new_tokens=DEFAULT_MAX_NEW_TOKENS, num_beams=1, do_sample=False,
                      temperature=1.0, top_p=1.0) -> dict:
    _, eot = chat_token_ids(tokenizer)
    kw = {"max_new_tokens": max_new_tokens, "num_beams": num_beams, "do_sample": do_sample,
          # The answer ends at <end_of_turn> (what Stage 2 supervised), or at <eos>.
          "eos_token_id": [eot] + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []),
          "pad_token_id": pad_token_id(tokenizer)}
    if do_sample:
        kw.update(temperature=temperature, top_p=top_p)
    else:  # the model's generation_config may hold sampling defaults; greedy/beam must not warn about them
        kw.update(temperature=None, top_p=None, top_k=None)
    return kw


def clean_answer(text: str) -> str:
    """One line: the CLI's contract is that the answer is the last line of standard output."""
    return re.sub(r"\s*\n\s*", " ", text).strip()


@torch.no_grad()
def generate_answers(model, tokenizer, batch: dict, **gen) -> list[str]:
    """Answers for a left-padded batch from VQACollator(padding_side="left")."""
    device = next(model.parameters()).device
    dtype = model.model.language_model.embed_tokens.weight.dtype
    if "token_type_ids" in batch:  # a Gemma 3 multimodal model's image-token marks
        gen = {**gen, "token_type_ids": batch["token_type_ids"].to(device)}
    out = model.generate(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                         pixel_values=batch["pixel_values"].to(device, dtype), **gen)
    new = out[:, batch["input_ids"].shape[1]:]
    return [clean_answer(t) for t in tokenizer.batch_decode(new, skip_special_tokens=True)]


def answer_questions(model, tokenizer, image_processor, images, questions, *, max_q_len=None, **gen) -> list[str]:
    """Answer questions[i] about images[i] (PIL images) in one left-padded batch, with the
    exact prompt Stage 2 trained on (for a Gemma 3 multimodal model, `image_processor` is its
    processor, and the prompt the one its chat template renders)."""
    collate = VQACollator(pad_token_id(tokenizer), padding_side="left")
    if is_base_vlm_config(model.config):
        items = [encode_prompt(image_processor, q, im, max_q_len=max_q_len) for im, q in zip(images, questions)]
        return generate_answers(model, tokenizer, collate(items), **gen)
    items = [{"input_ids": torch.tensor(build_prompt(tokenizer, model.config, q, max_q_len)),
              # As the tower was trained: padded to a square when its processor records --pad_to_square.
              "pixel_values": image_processor(images=prepare_image(im, image_processor),
                                              return_tensors="pt")["pixel_values"][0]}
             for im, q in zip(images, questions)]
    return generate_answers(model, tokenizer, collate(items), **gen)


# ---------------------------------------------------------------- CLI


def main(argv=None) -> str:
    parser, args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stderr, level=logging.INFO, force=True)
    if args.temperature != 1.0 and not args.do_sample:
        logger.warning("--temperature is ignored without --do_sample (decoding is greedy/beam)")
    try:
        image = load_image(args.image_path)
    except ImageLoadError as e:
        parser.error(str(e))
    try:
        model, tokenizer, image_processor, source = load_model(
            args.model_path, llm_path=args.llm_path, projector_path=args.projector_path,
            vision_model_name=args.vision_model_name, device=args.device,
            dtype=resolve_dtype(args.dtype, args.device), allow_vision_tower_mismatch=args.allow_vision_tower_mismatch)
    except (FileNotFoundError, ValueError) as e:
        parser.error(str(e))
    gen = generation_kwargs(tokenizer, max_new_tokens=args.max_new_tokens, num_beams=args.num_beams,
                            do_sample=args.do_sample, temperature=args.temperature, top_p=args.top_p)
    if args.do_sample:
        torch.manual_seed(args.seed)
    answer = answer_questions(model, tokenizer, image_processor, [image], [args.question],
                              max_q_len=args.max_q_len, **gen)[0]
    if args.json:
        settings = {"max_new_tokens": args.max_new_tokens, "num_beams": args.num_beams, "do_sample": args.do_sample,
                    "device": args.device, "dtype": str(next(model.parameters()).dtype).replace("torch.", "")}
        if args.do_sample:
            settings.update(temperature=args.temperature, top_p=args.top_p, seed=args.seed)
        print(json.dumps({"question": args.question, "answer": answer, "image": str(args.image_path),
                          "model": source, "generation": settings}))
    else:
        print(answer)
    return answer


if __name__ == "__main__":
    cli.run(main)
