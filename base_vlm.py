"""A Gemma 3 multimodal checkpoint as Stage2's starting point (`--base_vlm`): MedGemma 4B/27B
or Gemma 3 4B/12B/27B, any `Gemma3ForConditionalGeneration`, fine-tuned as it ships, with no
Stage1 projector alignment.

Such a model brings its own pooled projector (patches average-pooled to `mm_tokens_per_image`
tokens, RMSNorm, one matmul) and its own processor: its image size, `image_seq_length` image
tokens between `<start_of_image>` and `<end_of_image>`, and `token_type_ids` that mark the
image tokens so that they attend to each other bidirectionally, as in pretraining. Every
prompt here is made by that processor from what the checkpoint's chat template renders, so
`processor.apply_chat_template(...)` at inference gives exactly the training ids.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from cli import UserError

logger = logging.getLogger("siglip_med")

BASE_VLM_TYPES = ("gemma3",)  # config.model_type of the checkpoints --base_vlm takes


def is_base_vlm_config(config) -> bool:
    """A model (or config) of the kind --base_vlm trains: it has its own processor and chat template."""
    config = getattr(config, "config", config)
    return getattr(config, "model_type", None) in BASE_VLM_TYPES


def is_base_vlm_folder(path) -> bool:
    try:
        return json.loads((Path(path) / "config.json").read_text()).get("model_type") in BASE_VLM_TYPES
    except (OSError, ValueError):
        return False


def check_4bit(flag: str = "--load_in_4bit") -> None:
    """QLoRA needs bitsandbytes and a CUDA GPU; refused in one line otherwise."""
    if not torch.cuda.is_available():
        raise UserError(f"{flag}: 4-bit loading (bitsandbytes NF4) needs a CUDA GPU and none is visible; "
                        "leave the flag out (LoRA on bf16 weights) or run on a GPU")
    import importlib.util
    if importlib.util.find_spec("bitsandbytes") is None:
        raise UserError(f"{flag}: bitsandbytes is not installed; pip install bitsandbytes, or leave the flag out")


def quantization_config():
    """Google's MedGemma fine-tuning recipe: NF4, double quantisation, bf16 compute and storage."""
    from transformers import BitsAndBytesConfig
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_use_double_quant=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_storage=torch.bfloat16)


def load_base_vlm(name, *, dtype=None, load_in_4bit: bool = False, flag: str = "--base_vlm", pan_and_scan=None):
    """(model, processor) of a Gemma3ForConditionalGeneration checkpoint (hub id or folder), in
    its stored dtype unless `dtype` says otherwise. Another architecture, a processor without
    the image tokens or a checkpoint without a chat template is refused in one line: Stage2
    trains on the prompt the checkpoint's own template renders. `pan_and_scan`: True/False sets
    the processor's pan-and-scan (extra crops of wide images); None keeps the checkpoint's
    setting, which is off unless its folder says otherwise."""
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor
    config = AutoConfig.from_pretrained(name)
    if not is_base_vlm_config(config):
        raise UserError(f"{flag} {name}: a {config.model_type!r} model; --base_vlm takes a Gemma 3 multimodal "
                        "checkpoint (Gemma3ForConditionalGeneration: google/medgemma-4b-it, google/gemma-3-4b-it, ...)")
    processor = AutoProcessor.from_pretrained(name)
    tok = getattr(processor, "tokenizer", None)
    if tok is None or getattr(tok, "image_token_id", None) is None or not hasattr(processor, "image_seq_length"):
        raise UserError(f"{flag} {name}: its processor ({type(processor).__name__}) is not a Gemma3Processor with "
                        "<image_soft_token>; pass the checkpoint's own folder, processor files included")
    if processor.image_seq_length != config.mm_tokens_per_image:
        raise UserError(f"{flag} {name}: the processor puts {processor.image_seq_length} image tokens per image, the "
                        f"model expects mm_tokens_per_image={config.mm_tokens_per_image}")
    if not processor.chat_template:
        raise UserError(f"{flag} {name}: no chat template; Stage2 trains on the prompt the checkpoint's template "
                        "renders, so pass an instruction-tuned (-it) checkpoint")
    if pan_and_scan is not None:
        processor.image_processor.do_pan_and_scan = bool(pan_and_scan)
    kw = {}
    if load_in_4bit:
        check_4bit()
        kw.update(quantization_config=quantization_config(), dtype=torch.bfloat16,
                  device_map={"": torch.cuda.current_device()})
    elif dtype is not None:
        kw["dtype"] = dtype
    from vision_tower import _checked_from_pretrained
    model = _checked_from_pretrained(AutoModelForImageTextToText, name, **kw)
    model.eval()
    logger.info("base VLM %s: %s, %s image tokens per %dpx image, stored in %s", name, type(model).__name__,
                config.mm_tokens_per_image, config.vision_config.image_size,
                str(next(model.parameters()).dtype).replace("torch.", ""))
    return model, processor


# ---------------------------------------------------------------- the prompt

def messages(question: str, image=None) -> list[dict]:
    """One user turn: the image, then the question (Google's MedGemma examples' order)."""
    item = {"type": "image"} if image is None else {"type": "image", "image": image}
    return [{"role": "user", "content": [item, {"type": "text", "text": question}]}]


def cut_question(tokenizer, question: str, max_q_len: int | None) -> str:
    """The question cut to `max_q_len` tokens (as text: the template renders text)."""
    question = str(question).strip()
    if not max_q_len:
        return question
    ids = tokenizer(question, add_special_tokens=False)["input_ids"]
    return question if len(ids) <= max_q_len else tokenizer.decode(ids[:max_q_len]).strip()


def encode_prompt(processor, question: str, image, *, max_q_len: int | None = None) -> dict:
    """input_ids, token_type_ids (1 on the image tokens) and pixel_values of the user turn up
    to `<start_of_turn>model\\n`, exactly as `processor.apply_chat_template(messages(question,
    image), add_generation_prompt=True, tokenize=True, return_dict=True)` gives them: the same
    call, so the ids cannot drift from what a user of the export gets."""
    # Gemma3Processor's own default (off) overrides the image processor's setting, so it is
    # passed on every call: a checkpoint or export saved with pan-and-scan on gets it.
    pan_and_scan = bool(getattr(processor.image_processor, "do_pan_and_scan", False))
    enc = processor.apply_chat_template(messages(cut_question(processor.tokenizer, question, max_q_len), image),
                                        add_generation_prompt=True, tokenize=True, return_dict=True,
                                        return_tensors="pt", processor_kwargs={"do_pan_and_scan": pan_and_scan})
    return {"input_ids": enc["input_ids"][0], "token_type_ids": enc["token_type_ids"][0],
            "pixel_values": enc["pixel_values"]}


def prompt_length(processor, question: str, max_q_len: int | None = None) -> int:
    """The prompt's token count without processing an image (for length-grouped batches)."""
    text = processor.apply_chat_template(messages(cut_question(processor.tokenizer, question, max_q_len)),
                                         add_generation_prompt=True, tokenize=False)
    n = len(processor.tokenizer(text, add_special_tokens=False)["input_ids"])
    return n + processor.image_seq_length + 4  # the image tokens, <end_of_image> and the blank lines around


def image_token_ids(processor) -> set[int]:
    """The image soft token and its boundary tokens: never supervised."""
    tok = processor.tokenizer
    return {tok.image_token_id, tok.convert_tokens_to_ids(tok.boi_token), tok.convert_tokens_to_ids(tok.eoi_token)}


# ---------------------------------------------------------------- export

def save_base_vlm(model, processor, out_dir) -> Path:
    """The fine-tuned model in Hugging Face format with the processor it was trained with (chat
    template, image processor, tokenizer): `AutoModelForImageTextToText` and `AutoProcessor`
    load it. Its default generation config is the inference CLI's greedy decoding; the base's
    sampling settings are kept beside it (vlm.SAMPLING_CONFIG)."""
    from vlm import SAMPLING_CONFIG, greedy_generation_config
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    gen = model.generation_config
    eot = processor.tokenizer.convert_tokens_to_ids("<end_of_turn>")
    eos = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
    if eot not in eos:
        gen.eos_token_id = [e for e in eos if e is not None] + [eot]
    sampling = greedy_generation_config(model)
    model.save_pretrained(out, safe_serialization=True)
    if sampling is not None:
        sampling.save_pretrained(out, config_file_name=SAMPLING_CONFIG)
    processor.save_pretrained(out)
    return out
