"""The vision-language model: a vision tower, an MLP projector and a causal LM, assembled as a
plain `transformers.LlavaForConditionalGeneration` so the exported folder loads with
`AutoModelForImageTextToText.from_pretrained` and serves wherever LLaVA models serve.

Every patch of the vision tower becomes one image token in the LM's input. SigLIP has no CLS
token, so its towers use `vision_feature_select_strategy="full"`; LLaVA's "default" `[:, 1:]`
would silently drop a real patch. Towers with a CLS token (DINOv2 / RadDino, CLIP) use "default".
"""
from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import (
    AutoImageProcessor,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

# The inference CLI's decoding: greedy, this many new tokens. An export's generation_config.json
# says the same, so generate(**inputs) and pipeline() without arguments answer as the CLI does.
from cli import DEFAULT_MAX_NEW_TOKENS
from projectors import (
    PROJECTOR_DIR,
    PROJECTOR_WEIGHTS,
    MLPProjector,
    _projector_config,
    load_projector,
    projector_of,
    tower_fingerprint,
)
from vision_tower import _checked_from_pretrained, load_image_processor, load_vision_tower, num_image_tokens

logger = logging.getLogger("siglip_med")

IMAGE_TOKEN_CANDIDATES = ("<image_soft_token>", "<image>")
# The base LM's own sampling settings (an `-it` model ships do_sample=true, top_k=64,
# top_p=0.95), kept beside the greedy default: GenerationConfig.from_pretrained(folder, SAMPLING_CONFIG).
SAMPLING_CONFIG = "sampling_generation_config.json"


def special_token_id(tokenizer, token: str) -> int | None:
    """The id of one token string, or None if the vocabulary lacks it. A dictionary lookup:
    `get_vocab()` would rebuild a 262k-entry dict for Gemma 3 on every call (0.4 s a sample)."""
    tid = tokenizer.convert_tokens_to_ids(token)
    if tid is None or (tid == tokenizer.unk_token_id and token != tokenizer.unk_token):
        return None
    return tid


def _image_token(tokenizer, num_rows: int) -> tuple[str, int, bool]:
    """The image placeholder: (token, id, added). Llava looks the placeholder's embedding up
    before splicing image features in, so its id must be a row of the LM's table. In order:
    Gemma 3's own `<image_soft_token>` / `<image>`; else an `<unusedN>` token (the Gemma 3
    tokenizer has 6,242 that text never produces), which keeps the LM's shapes and so keeps
    adapters and tools made for the base checkpoint working; only if neither exists, a new
    token, which resizes the embedding table and tied head."""
    for tok in IMAGE_TOKEN_CANDIDATES:
        tid = special_token_id(tokenizer, tok)
        if tid is not None and tid < num_rows:
            return tok, tid, False
    for n in range(64):
        tok = f"<unused{n}>"
        tid = special_token_id(tokenizer, tok)
        if tid is not None and tid < num_rows:
            return tok, tid, False
    tokenizer.add_tokens(["<image>"], special_tokens=True)
    return "<image>", tokenizer.convert_tokens_to_ids("<image>"), True


def build_vlm(vision_model_name, llm_name, *, projector_depth: int = 2, torch_dtype=None):
    """Assemble LlavaForConditionalGeneration(pretrained tower, new projector, pretrained LM).

    Returns (model, tokenizer, image_processor). Every pretrained weight is copied in under
    LLaVA's key names and the copy is strict, so nothing pretrained is left random.
    """
    tower, has_cls = load_vision_tower(vision_model_name, torch_dtype=torch_dtype)
    image_processor = load_image_processor(vision_model_name, tower.config)
    tokenizer = AutoTokenizer.from_pretrained(llm_name)
    lm = _checked_from_pretrained(AutoModelForCausalLM, llm_name,
                                  **({"dtype": torch_dtype} if torch_dtype is not None else {}))
    base = getattr(lm, lm.base_model_prefix)
    image_token, image_token_id, _ = _image_token(tokenizer, lm.get_input_embeddings().num_embeddings)
    if image_token_id >= lm.get_input_embeddings().num_embeddings:
        # Neither a placeholder nor an unused token exists: a new row (never seen by the LM, as
        # Llava replaces it with image features) at the cost of a resized table.
        old = lm.get_input_embeddings().num_embeddings
        logger.warning("the LM tokenizer has no image placeholder and no <unusedN> token: added %s and resized "
                       "the embedding table from %d rows; the exported LM no longer matches the base's shapes",
                       image_token, old)
        lm.resize_token_embeddings(max(len(tokenizer), image_token_id + 1), mean_resizing=False)
        with torch.no_grad():  # the mean row (Hewitt 2021) keeps new logits ordinary; cheap for 262k rows
            table = lm.get_input_embeddings().weight
            table[old:] = table[:old].mean(0)
    n_tokens = num_image_tokens(image_processor, tower.config)
    config = LlavaConfig(
        vision_config=tower.config.to_dict(),
        text_config=lm.config.to_dict(),
        image_token_index=image_token_id,
        image_seq_length=n_tokens,
        vision_feature_select_strategy="default" if has_cls else "full",
        vision_feature_layer=-1,
        projector_hidden_act="gelu",
        multimodal_projector_bias=True,
        tie_word_embeddings=lm.config.tie_word_embeddings,
    )
    if getattr(config.text_config, "final_logit_softcapping", None):
        warnings.warn("the LM sets final_logit_softcapping; LlavaForConditionalGeneration does not "
                      "apply it, so exported logits differ from the LM's own")
    # The projector reads the tower's features and LLaVA casts its output to the LM's dtype, so
    # it is created in the tower's stored dtype: a model built from bf16 checkpoints then runs
    # without autocast. Training upcasts it (with everything else that trains) to fp32 master
    # weights (training.precision.master_weights).
    projector = MLPProjector(tower.config.hidden_size, config.text_config.hidden_size,
                             depth=projector_depth).to(next(tower.parameters()).dtype)
    with _empty_weights():
        model = LlavaForConditionalGeneration(config)
    if projector_depth != 2:
        model.model.multi_modal_projector = projector
    state = {}
    for prefix, module in (("model.vision_tower.", tower), ("model.multi_modal_projector.", projector),
                           ("model.language_model.", base), ("lm_head.", lm.lm_head)):
        state.update({prefix + k: v for k, v in module.state_dict().items()})
    model.load_state_dict(state, strict=True, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.language_model.embed_tokens.weight
    left = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    if left:
        raise RuntimeError(f"weights left uninitialised after assembling the VLM: {left[:5]}")
    model.generation_config = lm.generation_config
    # Generated text must never contain the placeholder: fed back in (a second turn) it would
    # no longer match the number of image features.
    model.generation_config.suppress_tokens = [image_token_id]
    model.config.pad_token_id = tokenizer.pad_token_id
    # Recorded for Stage2 and the CLI to default to: a local folder as an absolute path, so a run
    # started from another folder finds it (a hub id stays as given).
    local = Path(str(vision_model_name))
    model.vision_tower_source = str(local.resolve()) if local.exists() else str(vision_model_name)
    if torch_dtype is not None:
        model.to(torch_dtype)
    model.eval()
    logger.info("VLM: %s (%s) + %d-layer projector + %s; %d image tokens per image, placeholder %s=%d",
                vision_model_name, config.vision_config.model_type, projector_depth, llm_name,
                n_tokens, image_token, image_token_id)
    return model, tokenizer, image_processor


def chat_template(image_token: str) -> str:
    """The Jinja chat template of the exported processor: it renders exactly the turn Stage 2
    trains on (Stage2.dataset.build_prompt), so `processor.apply_chat_template` + `processor(...)`
    and `pipeline("image-text-to-text")` give the training ids. The image placeholder is
    emitted once and comes before the text (the training order); the processor expands it to
    one token per image feature. No <bos>: the tokenizer adds it. Gemma's own `-it` template
    emits `<start_of_image>` and its expansion, which this VLM never saw."""
    nl = "{{ '\\n' }}"
    return (
        "{%- for message in messages -%}"
        "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
        "{{ '<start_of_turn>' + role }}" + nl +
        "{%- if message['content'] is string -%}{{ message['content'] | trim }}"
        "{%- else -%}"
        "{%- for item in message['content'] if item['type'] == 'image' -%}" + image_token.replace("'", "") +
        "{%- endfor -%}"
        "{%- for item in message['content'] if item['type'] == 'text' -%}{{ item['text'] | trim }}{%- endfor -%}"
        "{%- endif -%}"
        "{{ '<end_of_turn>' }}" + nl +
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<start_of_turn>model' }}" + nl + "{%- endif -%}"
    )


def _processor(model, tokenizer, image_processor):
    from transformers import LlavaProcessor
    cfg = model.config
    token = tokenizer.convert_ids_to_tokens(cfg.image_token_index)
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer,
                          patch_size=cfg.vision_config.patch_size,
                          vision_feature_select_strategy=cfg.vision_feature_select_strategy,
                          image_token=token,
                          num_additional_image_tokens=int(cfg.vision_feature_select_strategy == "default"),
                          chat_template=chat_template(token))


def save_vlm(model, tokenizer, image_processor, out_dir) -> Path:
    """Write a folder that plain transformers loads (`AutoModelForImageTextToText`,
    `AutoProcessor`), plus `projection_layer/` with the projector alone."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    proj_cfg = _projector_config(model)
    # Which tower the projector reads: Stage2 and the inference CLI default to it and refuse another.
    proj_cfg["vision_tower"] = {"source": getattr(model, "vision_tower_source", None),
                                "sha256": tower_fingerprint(model.model.vision_tower)}
    if proj_cfg["depth"] != 2:
        warnings.warn(f"projector depth {proj_cfg['depth']} != 2: LlavaForConditionalGeneration has a "
                      f"fixed 2-layer projector, so {out} does NOT load with plain transformers; "
                      "use vlm.load_vlm")
    # generate() and pipelines stop where Stage 2 taught the model to stop.
    eot = special_token_id(tokenizer, "<end_of_turn>")
    gen = model.generation_config
    eos = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
    if eot is not None and eot not in eos:
        gen.eos_token_id = [e for e in eos if e is not None] + [eot]
    sampling = greedy_generation_config(model)
    model.save_pretrained(out, safe_serialization=True)
    if sampling is not None:
        sampling.save_pretrained(out, config_file_name=SAMPLING_CONFIG)
    # The folder's tokenizer carries the VLM's template too (a `-it` tokenizer's own one
    # would emit <start_of_image>); the caller's tokenizer object is left as it was.
    own = getattr(tokenizer, "chat_template", None)
    tokenizer.chat_template = chat_template(tokenizer.convert_ids_to_tokens(model.config.image_token_index))
    try:
        tokenizer.save_pretrained(out)
        image_processor.save_pretrained(out)
        try:
            _processor(model, tokenizer, image_processor).save_pretrained(out)
        except Exception as e:  # a processor is a convenience; the model folder is complete without it
            warnings.warn(f"could not save a LlavaProcessor ({e}); load tokenizer and image processor separately")
    finally:
        tokenizer.chat_template = own
    pdir = out / PROJECTOR_DIR
    pdir.mkdir(exist_ok=True)
    from safetensors.torch import save_file
    state = {k: v.detach().to("cpu").contiguous() for k, v in projector_of(model).state_dict().items()}
    save_file(state, str(pdir / PROJECTOR_WEIGHTS))
    (pdir / "config.json").write_text(json.dumps(proj_cfg, indent=2))
    return out


def greedy_generation_config(model):
    """Make the model's generation config the inference CLI's decoding (greedy, no sampling
    knobs, DEFAULT_MAX_NEW_TOKENS); return the sampling config it replaced, if any. An `-it`
    LM's config samples, so the README's `model.generate(**inputs)` and `pipeline(...)` gave a
    different answer on every call instead of the CLI's."""
    import copy
    gen = model.generation_config
    sampling = copy.deepcopy(gen) if gen.do_sample else None
    gen.do_sample, gen.num_beams = False, 1
    gen.temperature = gen.top_p = gen.top_k = None
    gen.max_new_tokens = DEFAULT_MAX_NEW_TOKENS
    gen.max_length = None
    return sampling


def load_vlm(path, *, torch_dtype=None):
    """Reload a `save_vlm` folder as (model, tokenizer, image_processor), including one whose
    projector is not LLaVA's 2-layer MLP (its weights then come from `projection_layer/`)."""
    from transformers import AutoModelForImageTextToText
    path = Path(path)
    depth = json.loads((path / PROJECTOR_DIR / "config.json").read_text())["depth"]
    kw = {"dtype": torch_dtype} if torch_dtype is not None else {}
    allow = (lambda k: "multi_modal_projector" in k) if depth != 2 else None
    model = _checked_from_pretrained(AutoModelForImageTextToText, path, allow=allow, **kw)
    if depth != 2:
        dtype = model.model.language_model.embed_tokens.weight.dtype
        model.model.multi_modal_projector = load_projector(path).to(dtype)
    model.eval()
    return model, AutoTokenizer.from_pretrained(path), AutoImageProcessor.from_pretrained(path)


def _empty_weights():
    # Parameters on the meta device (every one is then assigned from a pretrained state dict),
    # buffers real: rotary inv_freq and position ids are not in any state dict.
    from accelerate import init_empty_weights
    return init_empty_weights(include_buffers=False)


# ---------------------------------------------------------------- loss

def supervised_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    logits = model.lm_head(hidden).float()
    cap = getattr(model.config.text_config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def lm_loss_on_supervised(model, input_ids, attention_mask, pixel_values, labels, *, reduction="mean",
                          token_type_ids=None):
    """Causal-LM cross-entropy with the LM head applied only where a next token is supervised.

    Gemma's 262k vocabulary makes full (B, T, V) logits the largest tensor of a step; the
    image tokens and the prompt never need them. Equals the loss from full logits.
    `token_type_ids` (a Gemma 3 multimodal model's, 1 on image tokens) make the image tokens
    attend to each other bidirectionally, as in its pretraining; without them it is all causal.
    """
    extra = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
    hidden = model.model(input_ids=input_ids, attention_mask=attention_mask,
                         pixel_values=pixel_values, use_cache=False, **extra).last_hidden_state
    targets = labels[:, 1:]
    keep = targets != -100
    if not keep.any():
        return hidden.sum() * 0.0
    logits = supervised_logits(model, hidden[:, :-1][keep])
    return F.cross_entropy(logits, targets[keep], reduction=reduction)
