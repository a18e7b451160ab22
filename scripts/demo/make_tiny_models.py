"""Build small SigLIP and Gemma3 models from configs, with tokenizers trained on local text.

Real runs load pretrained towers from the hub (see the launchers). This machine-independent
stand-in exists so the tests and the quickstart exercise the exact same code paths
(`from_pretrained` on a local folder) with no network. The weights are random: results
printed from these models say so.

    python scripts/demo/make_tiny_models.py --out_dir runs/tiny --texts data/demo/stage0_train.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    PreTrainedTokenizerFast,
    SiglipConfig,
    SiglipImageProcessor,
    SiglipModel,
)

# Gemma3's own special tokens, so the chat format and image placeholder code paths are the
# ones a real Gemma3 tokenizer takes.
GEMMA_SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>",
                 "<start_of_image>", "<image_soft_token>"]
SIGLIP_SPECIAL = ["<pad>", "</s>", "<unk>"]
# Llama 3's own special tokens (the base of the LLM2Vec checkpoints); Llama 3 has no pad token.
LLAMA3_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"]

# The chat template google/gemma-3-*-it ship (tokenizer_config.json "chat_template" of
# google/gemma-3-1b-it and gemma-3-4b-it; the same text as transformers' Gemma 3 tests and the
# ggml-org/gemma-3-270m-GGUF metadata). A system message is folded into the first user turn,
# an image item becomes <start_of_image>, and {{ bos_token }} is emitted although the
# tokenizer also adds <bos> when the rendered text is encoded with special tokens.
GEMMA3_IT_CHAT_TEMPLATE = (
    "{{ bos_token }}\n"
    "{%- if messages[0]['role'] == 'system' -%}\n"
    "    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}\n"
    "    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}\n"
    "    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n"
    "{%- else -%}\n"
    "    {%- set first_user_prefix = \"\" -%}\n"
    "    {%- set loop_messages = messages -%}\n"
    "{%- endif -%}\n"
    "{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    "        {{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}\n"
    "    {%- endif -%}\n"
    "    {%- if (message['role'] == 'assistant') -%}\n"
    "        {%- set role = \"model\" -%}\n"
    "    {%- else -%}\n"
    "        {%- set role = message['role'] -%}\n"
    "    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n"
    "        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n"
    "        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n"
    "                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n"
    "                {{ item['text'] | trim }}\n"
    "            {%- endif -%}\n"
    "        {%- endfor -%}\n"
    "    {%- else -%}\n"
    "        {{ raise_exception(\"Invalid content type\") }}\n"
    "    {%- endif -%}\n"
    "    {{ '<end_of_turn>\n' }}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}\n"
    "    {{'<start_of_turn>model\n'}}\n"
    "{%- endif -%}\n"
)

# RAD-DINO's preprocessing (microsoft/rad-dino preprocessor_config.json): resize the short
# side to 518 and center-crop 518 (37 x 37 patches of 14 px), with the mean and std of its
# chest X-ray training set rather than ImageNet's.
RAD_DINO_SIZE, RAD_DINO_MEAN, RAD_DINO_STD = 518, [0.5307] * 3, [0.2583] * 3


def _texts_from_files(paths) -> list[str]:
    texts = []
    for p in paths:
        for row in json.loads(Path(p).read_text()):
            texts += [str(row[k]) for k in ("caption", "problem", "normal_caption") if k in row]
    return texts


def _train_bpe(texts, special, vocab_size) -> Tokenizer:
    # Byte-level BPE: any input string round-trips through encode/decode, so generated
    # answers decode to readable text and unseen words never become <unk>.
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts or ["a"], trainer=trainer)
    return tok


def _sentencepiece_siglip_tokenizer(texts, vocab_size, text_len, workdir: Path):
    """The tokenizer class real SigLIP checkpoints ship (sentencepiece; </s> is both pad and
    eos, as in google/siglip-*), trained on the given texts."""
    import sentencepiece as spm
    from transformers import SiglipTokenizer
    workdir.mkdir(parents=True, exist_ok=True)
    n_chars = len(set("".join(texts)))
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_prefix=str(workdir / "spiece"),
                                   vocab_size=min(vocab_size, 150 + n_chars), pad_id=0, eos_id=1,
                                   unk_id=2, bos_id=-1, minloglevel=2, hard_vocab_limit=False)
    return SiglipTokenizer(vocab_file=str(workdir / "spiece.model"), model_max_length=text_len)


# Real architectures, for GPU checks and the benchmark (weights random; speed and memory do
# not depend on them). Vision and text towers share these sizes in the released checkpoints.
SIGLIP_PRESETS = {
    "b16-224": dict(image_size=224, patch_size=16, hidden_size=768, intermediate_size=3072, num_layers=12,
                    num_heads=12, model_vocab_size=32000),
    "l16-384": dict(image_size=384, patch_size=16, hidden_size=1024, intermediate_size=4096, num_layers=24,
                    num_heads=16, model_vocab_size=32000),  # the XraySigLIP shape
    "so400m-384": dict(image_size=384, patch_size=14, hidden_size=1152, intermediate_size=4304, num_layers=27,
                       num_heads=16, model_vocab_size=32000),
}
GEMMA3_PRESETS = {
    "1b": dict(hidden_size=1152, intermediate_size=6912, num_layers=26, num_heads=4, head_dim=256,
               model_vocab_size=262144, sliding_window=512, max_position_embeddings=32768,
               rope_theta=1_000_000.0, query_pre_attn_scalar=256),
}


def build_tiny_siglip(out_dir, texts, *, image_size=112, patch_size=16, hidden_size=96,
                      num_layers=4, num_heads=4, text_len=64, vocab_size=1024, seed=0,
                      tokenizer_kind="bpe", intermediate_size=None, model_vocab_size=None, hub_shaped=False,
                      dtype=None, tokenizer_from=None) -> Path:
    """A SigLIP (vision + text towers) saved like a hub checkpoint: model, image processor,
    tokenizer. The text length is fixed by the checkpoint, as for real SigLIP.
    tokenizer_kind="sentencepiece" gives the SiglipTokenizer class of real checkpoints.

    hub_shaped=True: what changes the code path against a real checkpoint: the sentencepiece
    tokenizer, the 64-token text length of google/siglip-* and weights stored in bf16.
    google/siglip-* themselves are fp32 on the hub; bf16 is how SigLIP towers reach users
    inside Gemma 3 / MedGemma / PaliGemma checkpoints and in fine-tunes saved from bf16
    training, and transformers 5 loads them in that dtype unless told otherwise.

    tokenizer_kind="siglip2": google/siglip2-*'s fixed-resolution checkpoints (model type siglip):
    the Gemma tokenizer of `tokenizer_from` (a folder; the packaged real Gemma 3 one) saved as
    transformers' SigLIP 2 converter writes it: a GemmaTokenizer that appends <eos> and no <bos>,
    pads on the right to 64 tokens, and says nothing of lowercasing."""
    if hub_shaped:
        tokenizer_kind, text_len = "sentencepiece", 64
        dtype = dtype or torch.bfloat16
    torch.manual_seed(seed)
    out_dir = Path(out_dir)
    if tokenizer_kind == "sentencepiece":
        tokenizer = _sentencepiece_siglip_tokenizer(texts, vocab_size, text_len, out_dir / "_spm")
        eos_id = tokenizer.eos_token_id
    elif tokenizer_kind == "siglip2":
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_from, add_bos_token=False, add_eos_token=True,
                                                  padding_side="right", model_max_length=text_len)
        eos_id = tokenizer.eos_token_id
    else:
        tok = _train_bpe(texts, SIGLIP_SPECIAL, vocab_size)
        eos_id = tok.token_to_id("</s>")
        # SigLIP's sentencepiece tokenizer appends </s>; the text tower pools the last position.
        tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", eos_id)])
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                            unk_token="<unk>", model_max_length=text_len)
    common = dict(hidden_size=hidden_size, intermediate_size=intermediate_size or 4 * hidden_size,
                  num_hidden_layers=num_layers, num_attention_heads=num_heads)
    config = SiglipConfig(
        text_config=dict(vocab_size=max(len(tokenizer), model_vocab_size or 0), max_position_embeddings=text_len,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=eos_id, bos_token_id=eos_id,
                         projection_size=hidden_size, **common),
        vision_config=dict(image_size=image_size, patch_size=patch_size, **common),
    )
    model = SiglipModel(config)
    with torch.no_grad():  # the SigLIP paper's init: t' = log 10, b = -10
        model.logit_scale.fill_(torch.log(torch.tensor(10.0)))
        model.logit_bias.fill_(-10.0)
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    SiglipImageProcessor(size={"height": image_size, "width": image_size}).save_pretrained(out_dir)
    return out_dir


def build_tiny_gemma3(out_dir, texts, *, hidden_size=96, num_layers=2, num_heads=2,
                      vocab_size=1024, seed=0, tokenizer_from=None, intermediate_size=None, head_dim=None,
                      model_vocab_size=None, dtype=None, hub_shaped=False, **config_kwargs) -> Path:
    """A Gemma3ForCausalLM with Gemma3's special tokens (<start_of_turn>, <end_of_turn>,
    <image_soft_token>) in a small byte-level BPE vocabulary, or with the tokenizer of a real
    Gemma 3 folder (`tokenizer_from`).

    hub_shaped=True saves it the way google/gemma-3-*-it ship: weights in bf16 (transformers 5
    loads a checkpoint in its stored dtype), a sampling generation_config.json and Gemma's own
    chat template in the tokenizer."""
    if hub_shaped:
        dtype = dtype or torch.bfloat16
    torch.manual_seed(seed)
    out_dir = Path(out_dir)
    if tokenizer_from:
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_from)
        bos_id = tokenizer.bos_token_id
        eot_id = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    else:
        tok = _train_bpe(texts, GEMMA_SPECIAL, vocab_size)
        bos_id = tok.token_to_id("<bos>")
        eot_id = tok.token_to_id("<end_of_turn>")
        tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", bos_id)])
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                            bos_token="<bos>", unk_token="<unk>", model_max_length=512)
    kw = dict(max_position_embeddings=1024, sliding_window=256)
    kw.update(config_kwargs)
    config = Gemma3TextConfig(
        vocab_size=max(len(tokenizer), model_vocab_size or 0), hidden_size=hidden_size,
        intermediate_size=intermediate_size or 4 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=1,
        head_dim=head_dim or hidden_size // num_heads,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=[tokenizer.eos_token_id, eot_id],
        bos_token_id=bos_id, tie_word_embeddings=True, **kw,
    )
    model = Gemma3ForCausalLM(config)
    if dtype is not None:
        model = model.to(dtype)
    model.generation_config.eos_token_id = config.eos_token_id
    if hub_shaped:
        model.generation_config = gemma3_it_generation_config(tokenizer)
        tokenizer.chat_template = GEMMA3_IT_CHAT_TEMPLATE
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def gemma3_it_generation_config(tokenizer):
    """generation_config.json as google/gemma-3-1b-it ships it: sampling (top-k 64, top-p 0.95),
    stopping at <eos> or <end_of_turn>, with this tokenizer's ids for them (1 and 106 in the real
    vocabulary). "hybrid" is deprecated in transformers 5 but still accepted, and it is what the
    released files say."""
    from transformers import GenerationConfig
    eot = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    return GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=[tokenizer.eos_token_id, eot],
                            pad_token_id=tokenizer.pad_token_id, cache_implementation="hybrid", do_sample=True,
                            top_k=64, top_p=0.95)


# google/medgemma-4b-it's image processing (preprocessor_config.json): 896 px squares, mean and
# std 0.5, bilinear; pan-and-scan left to the caller (null in the file, off in Gemma3Processor).
MEDGEMMA_IMAGE_MEAN = MEDGEMMA_IMAGE_STD = [0.5, 0.5, 0.5]
# Gemma 3 4B's token ids around an image, and its 262,208-row table (262,144 text tokens, then
# <image_soft_token> and 63 more rows).
MEDGEMMA_BOI, MEDGEMMA_EOI, MEDGEMMA_IMAGE_TOKEN, MEDGEMMA_VOCAB = 255999, 256000, 262144, 262208


def medgemma_processor(tokenizer_from, *, image_size: int, image_seq_length: int):
    """A Gemma3Processor as google/medgemma-4b-it ships it, around the tokenizer of a real Gemma 3
    folder: <start_of_image>/<end_of_image>/<image_soft_token> as the tokenizer's boi/eoi/image
    tokens (the packaged 270M tokenizer lacks <image_soft_token>; added, it takes id 262144 as
    in MedGemma) and the -it chat template."""
    from transformers import AutoTokenizer, Gemma3Processor
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil
    extra = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
    tok = AutoTokenizer.from_pretrained(tokenizer_from, extra_special_tokens=extra)
    tok.add_tokens(["<image_soft_token>"], special_tokens=True)
    ids = [tok.convert_tokens_to_ids(t) for t in extra.values()]
    if ids != [MEDGEMMA_BOI, MEDGEMMA_EOI, MEDGEMMA_IMAGE_TOKEN]:
        raise ValueError(f"{tokenizer_from}: image token ids {ids}, not Gemma 3's; pass a Gemma 3 tokenizer folder")
    tok.chat_template = GEMMA3_IT_CHAT_TEMPLATE
    # The PIL backend: the default one needs torchvision, and both give the same pixels.
    images = Gemma3ImageProcessorPil(size={"height": image_size, "width": image_size}, image_mean=MEDGEMMA_IMAGE_MEAN,
                                     image_std=MEDGEMMA_IMAGE_STD, resample=2)
    return Gemma3Processor(image_processor=images, tokenizer=tok, chat_template=GEMMA3_IT_CHAT_TEMPLATE,
                           image_seq_length=image_seq_length)


def build_tiny_medgemma(out_dir, *, tokenizer_from=None, image_size=32, patch_size=8, mm_tokens_per_image=4,
                        vision_hidden_size=64, vision_layers=2, hidden_size=64, num_layers=2, num_heads=2,
                        seed=0, dtype=torch.bfloat16) -> Path:
    """A Gemma3ForConditionalGeneration shaped like google/medgemma-4b-it, small: a SigLIP vision
    tower without its pooling head, the pooled projector (MedGemma pools 64x64 patches of its
    896 px image to 16x16 = 256 tokens; here (image_size/patch_size)^2 patches pool to
    `mm_tokens_per_image`), a Gemma 3 LM with MedGemma's 262,208-row tied table, the real Gemma 3
    tokenizer (`tokenizer_from`, default the packaged 270M's) with the image tokens, the -it chat
    template, a sampling generation config, and weights stored in bf16. Random weights."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration
    if tokenizer_from is None:
        from scripts.demo.prepare_gemma270m import prepare_gemma270m
        tokenizer_from = prepare_gemma270m()
    side, per_side = image_size // patch_size, int(mm_tokens_per_image ** 0.5)
    if per_side * per_side != mm_tokens_per_image or side % per_side:
        raise ValueError(f"{side}x{side} patches do not pool evenly to {mm_tokens_per_image} tokens")
    torch.manual_seed(seed)
    out_dir = Path(out_dir)
    processor = medgemma_processor(tokenizer_from, image_size=image_size, image_seq_length=mm_tokens_per_image)
    tok = processor.tokenizer
    config = Gemma3Config(
        text_config=dict(vocab_size=MEDGEMMA_VOCAB, hidden_size=hidden_size, intermediate_size=4 * hidden_size,
                         num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=1,
                         head_dim=hidden_size // num_heads, max_position_embeddings=1024, sliding_window=256,
                         pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                         eos_token_id=[tok.eos_token_id, tok.convert_tokens_to_ids("<end_of_turn>")]),
        vision_config=dict(model_type="siglip_vision_model", image_size=image_size, patch_size=patch_size,
                           hidden_size=vision_hidden_size, intermediate_size=4 * vision_hidden_size,
                           num_hidden_layers=vision_layers, num_attention_heads=2, layer_norm_eps=1e-6,
                           vision_use_head=False),
        mm_tokens_per_image=mm_tokens_per_image, boi_token_index=MEDGEMMA_BOI, eoi_token_index=MEDGEMMA_EOI,
        image_token_index=MEDGEMMA_IMAGE_TOKEN, tie_word_embeddings=True)
    model = Gemma3ForConditionalGeneration(config)
    with torch.no_grad():  # a fresh RMSNorm weight is 0 (scale 1 + w); a random projector reads the image
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0.0, vision_hidden_size ** -0.5)
    model = model.to(dtype)
    model.generation_config = gemma3_it_generation_config(tok)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


def build_tiny_dinov2(out_dir, *, image_size=64, patch_size=8, hidden_size=64, num_layers=2, num_heads=2,
                      seed=0, hub_shaped=False, dtype=None) -> Path:
    """A Dinov2Model (the RAD-DINO architecture) with DINOv2's own preprocessing: resize the
    short side and center-crop, ImageNet mean and std.

    hub_shaped=True: microsoft/rad-dino's shape where it changes the code path: 14 px patches,
    a 518 px position table, and its processor (short side 518, center crop 518, its own mean
    and std). Its weights are fp32 on the hub (about 350 MB for 87M parameters), so fp32 here
    unless `dtype` says otherwise."""
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    if hub_shaped:
        image_size, patch_size, mean, std = RAD_DINO_SIZE, 14, RAD_DINO_MEAN, RAD_DINO_STD
    torch.manual_seed(seed)
    out_dir = Path(out_dir)
    config = Dinov2Config(image_size=image_size, patch_size=patch_size, hidden_size=hidden_size,
                          num_hidden_layers=num_layers, num_attention_heads=num_heads, mlp_ratio=4)
    model = Dinov2Model(config)
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(out_dir)
    BitImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
                      do_center_crop=True, image_mean=mean, image_std=std, resample=3,
                      do_convert_rgb=True).save_pretrained(out_dir)
    return out_dir


def build_tiny_bert(out_dir, texts, *, hidden_size=64, num_layers=2, num_heads=2, vocab_size=600,
                    seed=0) -> Path:
    """A BertModel with a WordPiece tokenizer trained on the given texts ([CLS] ... [SEP])."""
    from tokenizers import normalizers
    from transformers import BertConfig, BertModel, BertTokenizerFast
    torch.manual_seed(seed)
    out_dir = Path(out_dir)
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(texts or ["a"], trainer=trainers.WordPieceTrainer(
        vocab_size=vocab_size, special_tokens=special, show_progress=False))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))])
    tokenizer = BertTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                  sep_token="[SEP]", mask_token="[MASK]", model_max_length=128)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, num_hidden_layers=num_layers,
                        num_attention_heads=num_heads, intermediate_size=4 * hidden_size, max_position_embeddings=128,
                        pad_token_id=tokenizer.pad_token_id)
    BertModel(config).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


# The BERT the RadGraph (v1) archive's config.json names; radgraph reads its tokenizer and
# config, its weights come from the archive's weights.th.
RADGRAPH_BERT_ID = "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract-fulltext"
RADGRAPH_ENTITY_LABELS = ["ANAT-DP", "OBS-DP", "OBS-U", "OBS-DA"]
RADGRAPH_RELATION_LABELS = ["modify", "located_at", "suggestive_of"]


def build_tiny_radgraph(out_dir, texts, *, model_type="radgraph-xl", bert_id=RADGRAPH_BERT_ID, entity=None,
                        relations=True, max_span_width=8, seed=0) -> dict:
    """A RadGraph model archive as StanfordAIMI/RRG_scorers' radgraph(-xl).tar.gz unpacks: a
    DyGIE++ config.json naming its BERT by hub id, vocabulary/ with RadGraph's entity and relation
    labels, and weights.th (the DyGIE model's state dict, tiny BERT included), random and seeded.
    entity (one of RADGRAPH_ENTITY_LABELS) plants the NER scorer so every candidate span (up to
    max_span_width words) is that entity; relations=False makes the relation scorer find none.
    The BERT is also a local folder and, under bert_id, a Hugging Face cache. Needs radgraph."""
    from clinical_metrics import _radgraph_tokenizer_shim
    out_dir = Path(out_dir)
    bert = build_tiny_bert(out_dir / "bert", texts, hidden_size=32, num_layers=2, num_heads=2, vocab_size=300,
                           seed=seed)
    archive = out_dir / model_type
    vocab_dir = archive / "vocabulary"
    vocab_dir.mkdir(parents=True, exist_ok=True)
    # AllenNLP's label files: the NER null label "" is index 0; relations have no null entry
    (vocab_dir / "non_padded_namespaces.txt").write_text("*tags\n*labels\n")
    (vocab_dir / f"{model_type}__ner_labels.txt").write_text("\n".join([""] + RADGRAPH_ENTITY_LABELS) + "\n")
    (vocab_dir / f"{model_type}__relation_labels.txt").write_text("\n".join(RADGRAPH_RELATION_LABELS) + "\n")

    def config(bert_name):  # DyGIE++'s training config, as the archive saves it (template.libsonnet's fields)
        embedder = {"type": "pretrained_transformer_mismatched", "model_name": bert_name, "max_length": 512}
        return {"dataset_reader": {"type": "dygie", "max_span_width": max_span_width,
                                   "token_indexers": {"bert": dict(embedder)}},
                "model": {"type": "dygie", "embedder": {"token_embedders": {"bert": embedder}},
                          "feature_size": 8, "max_span_width": max_span_width, "target_task": "relation",
                          "feedforward_params": {"num_layers": 2, "hidden_dims": 16, "dropout": 0.4},
                          "loss_weights": {"ner": 0.2, "relation": 1.0, "coref": 0.0, "events": 0.0},
                          "initializer": {"regexes": [["_span_width_embedding.weight", {"type": "xavier_normal"}]]},
                          "module_initializer": {"regexes": [[".*weight", {"type": "xavier_normal"}],
                                                             [".*weight_matrix", {"type": "xavier_normal"}]]},
                          "modules": {"coref": {"spans_per_word": 0.3, "max_antecedents": 100, "coref_prop": 0},
                                      "ner": {}, "relation": {"spans_per_word": 0.5, "positive_label_weight": 1.0},
                                      "events": {"trigger_spans_per_word": 0.3, "argument_spans_per_word": 0.8,
                                                 "loss_weights": {"trigger": 1.0, "arguments": 0.5}}}},
                "data_loader": {"batch_size": 1}, "trainer": {"num_epochs": 50, "cuda_device": 0}}

    # The model as radgraph.RadGraph builds it from config.json (its strict load checks the keys)
    from radgraph.allennlp.data import Vocabulary
    from radgraph.allennlp.modules import text_field_embedders, token_embedders
    from radgraph.dygie.models.dygie import DyGIE
    _radgraph_tokenizer_shim()
    torch.manual_seed(seed)
    model_args = config(str(bert))["model"]
    bert_embedder = token_embedders.PretrainedTransformerMismatchedEmbedder(model_name=str(bert), max_length=512)
    embedder = text_field_embedders.BasicTextFieldEmbedder({"bert": bert_embedder})
    for key in ("type", "embedder", "initializer", "module_initializer"):
        model_args.pop(key)
    model = DyGIE(vocab=Vocabulary.from_files(str(vocab_dir)), embedder=embedder, **model_args)
    (vocab_dir / ".lock").unlink(missing_ok=True)  # AllenNLP's lock file, not part of an archive
    state = model.state_dict()
    if entity is not None:
        ner = f"_ner._ner_scorers.{model_type}__ner_labels.1._module"  # scores of the labels after the null one
        state[f"{ner}.weight"].zero_()
        state[f"{ner}.bias"].fill_(-10.0)[RADGRAPH_ENTITY_LABELS.index(entity)] = 10.0
    if not relations:  # every label below the null class's 0
        scorer = f"_relation._relation_scorers.{model_type}__relation_labels"
        state[f"{scorer}.weight"].zero_()
        state[f"{scorer}.bias"].fill_(-10.0)
    torch.save(state, archive / "weights.th")
    (archive / "config.json").write_text(json.dumps(config(bert_id), indent=2))
    cache = out_dir / "hf_cache"
    to_hf_cache(bert, bert_id, cache)
    return {"archive": archive, "bert_dir": bert, "bert_id": bert_id, "cache_dir": cache}


def build_tiny_llama(out_dir, texts, *, hidden_size=64, num_layers=2, num_heads=2, vocab_size=400, seed=0,
                     dtype=torch.bfloat16) -> Path:
    """A LlamaForCausalLM shaped like meta-llama/Meta-Llama-3-*-Instruct where it matters to a
    text tower: Llama 3's special tokens, <|begin_of_text|> prepended, no pad token, untied
    embeddings, weights stored in bf16."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    out_dir = Path(out_dir)
    tok = _train_bpe(texts, LLAMA3_SPECIAL, vocab_size)
    bos_id, eos_id = tok.token_to_id("<|begin_of_text|>"), tok.token_to_id("<|end_of_text|>")
    tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                       special_tokens=[("<|begin_of_text|>", bos_id)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>",
                                        eos_token="<|end_of_text|>", model_max_length=512)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=1,
                         max_position_embeddings=512, bos_token_id=bos_id, eos_token_id=eos_id,
                         tie_word_embeddings=False, rope_theta=500000.0)
    model = LlamaForCausalLM(config).to(dtype)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


LLM2VEC_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_llm2vec_mntp_adapter(out_dir, base_dir, base_id, *, r=16, alpha=32, seed=0) -> Path:
    """A PEFT LoRA adapter folder laid out as McGill-NLP/LLM2Vec-*-mntp ship theirs: trained on
    the base's inner model (keys `base_model.model.layers.N...`), `base_model_name_or_path` the
    base's hub id, the base's config and tokenizer next to it. The real config.json also maps
    AutoModel to the repo's bidirectional Llama code; transformers 5 needs none
    (`config.is_causal = False`), so that entry is left out. B is random (a fresh LoRA has B = 0,
    which would make merging a no-op that no test could see)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    torch.manual_seed(seed)
    out_dir = Path(out_dir)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).model
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.05, bias="none", target_modules=LLM2VEC_LORA_TARGETS)
    peft_model = get_peft_model(base, cfg)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.02)
    peft_model.save_pretrained(out_dir)
    adapter_cfg = json.loads((out_dir / "adapter_config.json").read_text())
    adapter_cfg["base_model_name_or_path"] = base_id
    (out_dir / "adapter_config.json").write_text(json.dumps(adapter_cfg, indent=2))
    config = AutoConfig.from_pretrained(base_dir)
    config._name_or_path = base_id
    config.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(out_dir)
    return out_dir


def to_hf_cache(folder, repo_id: str, cache_dir, *, revision: str | None = None) -> Path:
    """Place a model folder in the Hugging Face cache layout (`models--ORG--NAME/blobs`,
    `snapshots/<commit>/` linking to the blobs, `refs/main`), so that `from_pretrained(repo_id)`
    resolves it with HF_HUB_OFFLINE=1 and HF_HUB_CACHE=cache_dir, as a downloaded model does."""
    import hashlib
    import os
    folder, cache_dir = Path(folder), Path(cache_dir)
    repo = cache_dir / ("models--" + repo_id.replace("/", "--"))
    files = sorted(f for f in folder.rglob("*") if f.is_file())
    commit = revision or hashlib.sha1("".join(f"{f.relative_to(folder)}:{f.stat().st_size}" for f in files)
                                      .encode() + repo_id.encode()).hexdigest()
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    for f in files:
        blob = repo / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        if not blob.exists():
            blob.write_bytes(f.read_bytes())
        link = snapshot / f.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def build_hub_llm2vec(out_dir, texts, *, base_id="tiny-hub/Meta-Llama-3-Instruct",
                      adapter_id="tiny-hub/LLM2Vec-Meta-Llama-3-Instruct-mntp", cache_dir=None, seed=0) -> dict:
    """An LLM2Vec MNTP checkpoint as users name it: a tiny Llama 3-shaped base and its MNTP
    adapter, as local folders and (both) in a Hugging Face cache under their hub ids."""
    out_dir = Path(out_dir)
    base = build_tiny_llama(out_dir / "base", texts, seed=seed)
    adapter = build_llm2vec_mntp_adapter(out_dir / "mntp", base, base_id, seed=seed)
    cache = Path(cache_dir or out_dir / "hf_cache")
    to_hf_cache(base, base_id, cache)
    to_hf_cache(adapter, adapter_id, cache)
    return {"base_id": base_id, "adapter_id": adapter_id, "cache_dir": cache, "base_dir": base,
            "adapter_dir": adapter}


def build_merlin_checkpoint(path, *, layers=(1, 1, 1, 1), width=8, seed=0) -> Path:
    """A checkpoint file with the keys of Merlin's official release
    (stanfordmimi/Merlin `i3_resnet_clinical_longformer_best_clip_*.pt`): one flat state dict of
    the whole CLIP model, the 3D image encoder under `encode_image.i3_resnet.` (its classifier
    and contrastive heads included) and the Clinical-Longformer text encoder under
    `encode_text.`. `layers`/`width` give a small I3ResNet of the same structure."""
    from Stage0.merlin import MerlinBackbone
    torch.manual_seed(seed)
    path = Path(path)
    state = {f"encode_image.i3_resnet.{k}": v for k, v in
             MerlinBackbone(layers=layers, width=width).state_dict().items()}
    state["encode_text.text_encoder.embeddings.word_embeddings.weight"] = torch.randn(16, 8)
    state["encode_text.linear_layer.weight"] = torch.randn(4, 8)
    state["encode_text.linear_layer.bias"] = torch.zeros(4)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path


def pretrain_lm(path, texts, *, steps=200, batch_size=32, max_len=96, lr=3e-3, seed=0) -> Path:
    """Next-token training on the given texts: the stand-in for a pretrained LLM. A random LM
    gives near-uniform logits whatever its inputs, which leaves a projector nothing to align to.
    Trains in fp32 and saves in the dtype the folder had (a bf16 checkpoint stays bf16)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(path)
    stored = AutoConfig.from_pretrained(path).dtype or torch.float32
    lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    opt = torch.optim.AdamW(lm.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    texts = [t + tok.eos_token for t in texts]
    lm.train()
    for step in range(steps):
        idx = torch.randint(len(texts), (batch_size,)).tolist()
        enc = tok([texts[i] for i in idx], padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        loss = lm(**enc, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lm.parameters(), 1.0)
        opt.step(), sched.step(), opt.zero_grad()
        if step % 50 == 0 or step == steps - 1:
            print(f"LM stand-in pretraining step {step}: loss {loss.item():.3f}", file=sys.stderr)
    lm.to(stored).save_pretrained(path)
    return Path(path)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out_dir", required=True, help="writes OUT/siglip and OUT/gemma3")
    p.add_argument("--texts", nargs="+", default=[], help="JSON files whose caption/problem/"
                   "normal_caption fields train the tokenizers (the demo data's JSON files)")
    p.add_argument("--image_size", type=int, default=112)
    p.add_argument("--hidden_size", type=int, default=96)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--siglip_preset", choices=["tiny", *SIGLIP_PRESETS], default="tiny",
                   help="a real SigLIP architecture instead of the small one (random weights)")
    p.add_argument("--gemma3_preset", choices=["tiny", *GEMMA3_PRESETS], default="tiny",
                   help="a real Gemma3 architecture instead of the small one (random weights, bf16)")
    p.add_argument("--gemma3_tokenizer", default=None,
                   help="take the tokenizer of this Gemma 3 folder (e.g. the packaged 270M's)")
    p.add_argument("--lm_pretrain_steps", type=int, default=0,
                   help="train the small Gemma3 on the texts first (a stand-in for a pretrained LLM)")
    p.add_argument("--hub_shaped", action="store_true",
                   help="save SigLIP and Gemma3 as the hub ships the real ones: bf16 weights, SigLIP's "
                        "sentencepiece tokenizer and 64-token text, Gemma 3 -it's sampling generation config "
                        "and chat template")
    p.add_argument("--extra", nargs="*", choices=["raddino", "llm2vec", "merlin"], default=[],
                   help="also write hub-shaped stand-ins: OUT/rad-dino (518 px processor), OUT/llm2vec (an MNTP "
                        "adapter and its base, as folders and in a Hugging Face cache at OUT/llm2vec/hf_cache), "
                        "OUT/merlin/merlin_official.pt (Merlin's official checkpoint keys)")
    return p.parse_args(argv)


def main(argv=None):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the project's modules
    import cli
    cli.quiet_library_noise()
    args = parse_args(argv)
    texts = _texts_from_files(args.texts)
    out = Path(args.out_dir)
    hub = args.hub_shaped
    if args.siglip_preset == "tiny":
        build_tiny_siglip(out / "siglip", texts, image_size=args.image_size,
                          hidden_size=args.hidden_size, seed=args.seed, hub_shaped=hub)
    else:
        build_tiny_siglip(out / "siglip", texts, seed=args.seed, hub_shaped=hub, **SIGLIP_PRESETS[args.siglip_preset])
    if args.gemma3_preset == "tiny":
        build_tiny_gemma3(out / "gemma3", texts, hidden_size=args.hidden_size, seed=args.seed,
                          tokenizer_from=args.gemma3_tokenizer, hub_shaped=hub)
    else:  # stored in bf16 as the released Gemma 3 checkpoints are
        build_tiny_gemma3(out / "gemma3", texts, seed=args.seed, tokenizer_from=args.gemma3_tokenizer,
                          dtype=torch.bfloat16, hub_shaped=hub, **GEMMA3_PRESETS[args.gemma3_preset])
    if args.lm_pretrain_steps:
        pretrain_lm(out / "gemma3", texts, steps=args.lm_pretrain_steps, seed=args.seed)
    if "raddino" in args.extra:
        build_tiny_dinov2(out / "rad-dino", hidden_size=32, num_layers=1, num_heads=2, seed=args.seed, hub_shaped=True)
    if "llm2vec" in args.extra:
        info = build_hub_llm2vec(out / "llm2vec", texts, seed=args.seed)
        print(f"LLM2Vec stand-in: HF_HUB_OFFLINE=1 HF_HUB_CACHE={info['cache_dir']} resolves "
              f"{info['adapter_id']} and {info['base_id']}", file=sys.stderr)
    if "merlin" in args.extra:
        build_merlin_checkpoint(out / "merlin" / "merlin_official.pt", seed=args.seed)
    print(f"Built config-initialised (random) SigLIP and Gemma3 under {out} (no download).",
          file=sys.stderr)
    return out


if __name__ == "__main__":
    main()
