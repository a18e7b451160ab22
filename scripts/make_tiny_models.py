"""Build small SigLIP and Gemma3 models from configs, with tokenizers trained on local text.

Real runs load pretrained towers from the hub (see the launchers). This machine-independent
stand-in exists so the tests and the quickstart exercise the exact same code paths
(`from_pretrained` on a local folder) with no network. The weights are random: results
printed from these models say so.

    python scripts/make_tiny_models.py --out_dir runs/tiny --texts data/demo/stage0_train.json
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
                      tokenizer_kind="bpe", intermediate_size=None, model_vocab_size=None) -> Path:
    """A SigLIP (vision + text towers) saved like a hub checkpoint: model, image processor,
    tokenizer. The text length is fixed by the checkpoint, as for real SigLIP.
    tokenizer_kind="sentencepiece" gives the SiglipTokenizer class of real checkpoints."""
    torch.manual_seed(seed)
    out_dir = Path(out_dir)
    if tokenizer_kind == "sentencepiece":
        tokenizer = _sentencepiece_siglip_tokenizer(texts, vocab_size, text_len, out_dir / "_spm")
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
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    SiglipImageProcessor(size={"height": image_size, "width": image_size}).save_pretrained(out_dir)
    return out_dir


def build_tiny_gemma3(out_dir, texts, *, hidden_size=96, num_layers=2, num_heads=2,
                      vocab_size=1024, seed=0, tokenizer_from=None, intermediate_size=None, head_dim=None,
                      model_vocab_size=None, dtype=None, **config_kwargs) -> Path:
    """A Gemma3ForCausalLM with Gemma3's special tokens (<start_of_turn>, <end_of_turn>,
    <image_soft_token>) in a small byte-level BPE vocabulary, or with the tokenizer of a real
    Gemma 3 folder (`tokenizer_from`)."""
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
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def build_tiny_dinov2(out_dir, *, image_size=64, patch_size=8, hidden_size=64, num_layers=2, num_heads=2,
                      seed=0) -> Path:
    """A Dinov2Model (the RAD-DINO architecture) with DINOv2's own preprocessing: resize the
    short side and center-crop, ImageNet mean and std."""
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model
    torch.manual_seed(seed)
    out_dir = Path(out_dir)
    config = Dinov2Config(image_size=image_size, patch_size=patch_size, hidden_size=hidden_size,
                          num_hidden_layers=num_layers, num_attention_heads=num_heads, mlp_ratio=4)
    Dinov2Model(config).save_pretrained(out_dir)
    BitImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
                      do_center_crop=True, image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225],
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


def pretrain_lm(path, texts, *, steps=200, batch_size=32, max_len=96, lr=3e-3, seed=0) -> Path:
    """Next-token training on the given texts: the stand-in for a pretrained LLM. A random LM
    gives near-uniform logits whatever its inputs, which leaves a projector nothing to align to."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(path)
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
    lm.save_pretrained(path)
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
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    texts = _texts_from_files(args.texts)
    out = Path(args.out_dir)
    if args.siglip_preset == "tiny":
        build_tiny_siglip(out / "siglip", texts, image_size=args.image_size,
                          hidden_size=args.hidden_size, seed=args.seed)
    else:
        build_tiny_siglip(out / "siglip", texts, seed=args.seed, **SIGLIP_PRESETS[args.siglip_preset])
    if args.gemma3_preset == "tiny":
        build_tiny_gemma3(out / "gemma3", texts, hidden_size=args.hidden_size, seed=args.seed,
                          tokenizer_from=args.gemma3_tokenizer)
    else:  # stored in bf16 as the released Gemma 3 checkpoints are
        build_tiny_gemma3(out / "gemma3", texts, seed=args.seed, tokenizer_from=args.gemma3_tokenizer,
                          dtype=torch.bfloat16, **GEMMA3_PRESETS[args.gemma3_preset])
    if args.lm_pretrain_steps:
        pretrain_lm(out / "gemma3", texts, steps=args.lm_pretrain_steps, seed=args.seed)
    print(f"Built config-initialised (random) SigLIP and Gemma3 under {out} (no download).",
          file=sys.stderr)
    return out


if __name__ == "__main__":
    main()
