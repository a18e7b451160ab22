"""Measure the repo's performance choices against the plain alternative, in one run.

Each row is a ratio of two code paths measured back to back on the same inputs, so it holds on
any machine; absolute times are only meaningful on the GPU they were taken on.

    python scripts/benchmark.py                 # CPU-sized shapes (a few minutes on 2 cores)
    python scripts/benchmark.py --device cuda   # larger shapes, bf16 autocast
    python scripts/benchmark.py --output_json runs/benchmark.json --output_md runs/benchmark.md
    python scripts/benchmark.py --quick         # one repeat each: a smoke run

Rows:
  lm_loss      LM loss with logits only at supervised positions vs logits at every position
               (Gemma3's 262,144-token vocabulary; an answer-length target after an image prompt)
  siglip_mem   activation memory the SigLIP loss keeps for backward: chunked vs naive (B x B)
  text_cache   Stage0 step with the frozen text tower's caption embeddings cached vs recomputed
  tokenize     Stage1/Stage2 sample token ids per second with the real Gemma 3 tokenizer (packaged
               270M; a small one if it is not installed): special tokens looked up once vs a
               get_vocab() dict rebuilt per lookup (the old path)
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F


def _timeit(fn, repeats, device):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench_lm_loss(args):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    cpu = args.device == "cpu"
    cfg = Gemma3TextConfig(vocab_size=262144, hidden_size=64 if cpu else 640, intermediate_size=256 if cpu else 2048,
                           num_hidden_layers=2 if cpu else 6, num_attention_heads=2 if cpu else 4,
                           num_key_value_heads=1, head_dim=32 if cpu else 256)
    lm = Gemma3ForCausalLM(cfg).to(args.device)
    b, prompt, answer = (4, 96, 16) if cpu else (16, 600, 64)  # image tokens + question, then answer
    ids = torch.randint(0, 1000, (b, prompt + answer), device=args.device)
    labels = torch.full_like(ids, -100)
    labels[:, prompt:] = ids[:, prompt:]

    def full():
        logits = lm(input_ids=ids).logits.float()
        F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1)).backward()

    def supervised():
        h = lm.model(input_ids=ids).last_hidden_state[:, :-1]
        keep = labels[:, 1:] != -100
        logits = lm.lm_head(h[keep]).float()
        F.cross_entropy(logits, labels[:, 1:][keep]).backward()

    with torch.autocast(args.device, dtype=torch.bfloat16, enabled=not cpu):
        t_full = _timeit(full, args.repeats, args.device)
        t_sup = _timeit(supervised, args.repeats, args.device)
    return {"row": "lm_loss", "baseline_s": t_full, "ours_s": t_sup, "speedup": t_full / t_sup,
            "shape": f"B={b}, {prompt} prompt + {answer} answer tokens, vocab 262144"}


def bench_siglip_memory(args):
    from losses import siglip_loss, siglip_loss_reference

    n, d = (2048, 256) if args.device == "cpu" else (16384, 1152)
    x = F.normalize(torch.randn(n, d, device=args.device), dim=-1).requires_grad_()
    y = F.normalize(torch.randn(n, d, device=args.device), dim=-1).requires_grad_()
    s = torch.tensor(2.3, device=args.device, requires_grad=True)
    bias = torch.tensor(-10.0, device=args.device, requires_grad=True)

    def saved_bytes(fn):
        seen = {}

        def pack(t):
            seen[(t.data_ptr(), t.shape)] = t.numel() * t.element_size()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = fn(x, y, s, bias)
        loss.backward()
        return sum(seen.values())

    naive = saved_bytes(siglip_loss_reference)
    ours = saved_bytes(lambda *a: siglip_loss(*a, chunk_size=1024))
    return {"row": "siglip_mem", "baseline_MiB": naive / 2**20, "ours_MiB": ours / 2**20,
            "reduction": naive / ours, "shape": f"B={n} (global), D={d}"}


def bench_text_cache(args):
    from transformers import SiglipConfig, SiglipModel

    cpu = args.device == "cpu"
    h = 128 if cpu else 768
    cfg = SiglipConfig(text_config=dict(hidden_size=h, intermediate_size=4 * h, num_hidden_layers=4 if cpu else 12,
                                        num_attention_heads=4 if cpu else 12, max_position_embeddings=64),
                       vision_config=dict(hidden_size=h, intermediate_size=4 * h, num_hidden_layers=4 if cpu else 12,
                                          num_attention_heads=4 if cpu else 12, image_size=64 if cpu else 224,
                                          patch_size=16))
    model = SiglipModel(cfg).to(args.device)
    model.text_model.requires_grad_(False)
    b = 32 if cpu else 256
    px = torch.randn(b, 3, cfg.vision_config.image_size, cfg.vision_config.image_size, device=args.device)
    ids = torch.randint(0, 1000, (b, 64), device=args.device)
    cached = F.normalize(model.get_text_features(input_ids=ids).pooler_output.detach(), dim=-1)

    from losses import siglip_loss

    def step(text):
        img = F.normalize(model.get_image_features(pixel_values=px).pooler_output, dim=-1)
        siglip_loss(img, text(), model.logit_scale, model.logit_bias).backward()

    def recompute():
        with torch.no_grad():
            return F.normalize(model.get_text_features(input_ids=ids).pooler_output, dim=-1)

    with torch.autocast(args.device, dtype=torch.bfloat16, enabled=not cpu):
        t_re = _timeit(lambda: step(recompute), args.repeats, args.device)
        t_cache = _timeit(lambda: step(lambda: cached), args.repeats, args.device)
    return {"row": "text_cache", "baseline_s": t_re, "ours_s": t_cache, "speedup": t_re / t_cache,
            "shape": f"B={b}, equal-size towers"}


def bench_tokenize(args):
    from types import SimpleNamespace

    from Stage2.dataset import END_OF_TURN, START_OF_TURN, build_example
    from transformers import AutoTokenizer
    try:
        from scripts.prepare_gemma270m import prepare_gemma270m
        path, which = prepare_gemma270m(), "Gemma 3 (262k vocab)"
    except ImportError:
        from scripts.make_tiny_models import build_tiny_gemma3
        import tempfile
        path = build_tiny_gemma3(Path(tempfile.mkdtemp()) / "g", ["is there an effusion"], vocab_size=400)
        which = "small BPE (gemma3-270m package not installed)"
    tok = AutoTokenizer.from_pretrained(path)
    config = SimpleNamespace(image_token_index=tok.bos_token_id, image_seq_length=576)
    qa = [("Is there a pleural effusion on the left side?", "Yes, a small left pleural effusion."),
          ("Describe the findings.", "Cardiomegaly. No pneumothorax.")] * 10

    def ours():
        for q, a in qa:
            build_example(tok, config, q, a)

    def old_path():  # what chat_token_ids did per call: two full vocabulary dicts per sample
        for q, a in qa:
            for _ in range(2):
                v = tok.get_vocab()
                v[START_OF_TURN], v[END_OF_TURN]
            build_example(tok, config, q, a)

    t_old = _timeit(old_path, max(1, args.repeats // 2), "cpu")
    t_new = _timeit(ours, args.repeats, "cpu")
    n = len(qa)
    return {"row": "tokenize", "baseline_s": t_old / n, "ours_s": t_new / n, "speedup": t_old / t_new,
            "samples_per_s": n / t_new, "shape": f"per Stage2 sample, {which}"}


def environment(args) -> dict:
    import platform

    import transformers
    return {"device": (f"cpu ({torch.get_num_threads()} threads, {platform.processor() or platform.machine()})"
                       if args.device == "cpu" else torch.cuda.get_device_name()),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "dtype": "float32" if args.device == "cpu" else "bfloat16 autocast",
            "attention": "sdpa", "compile": False, "quick": bool(args.quick)}


def markdown(env: dict, rows: list[dict]) -> str:
    head = (f"device: {env['device']}; torch {env['torch']}, transformers {env['transformers']}; "
            f"{env['dtype']}; attention {env['attention']}; compile {'on' if env['compile'] else 'off'}")
    lines = [head, "", "| benchmark | shape | plain | ours | ratio |", "|---|---|---|---|---|"]
    for r in rows:
        if "speedup" in r:
            lines.append(f"| {r['row']} | {r['shape']} | {r['baseline_s']*1e3:.1f} ms | {r['ours_s']*1e3:.1f} ms "
                         f"| {r['speedup']:.1f}x faster |")
        else:
            lines.append(f"| {r['row']} | {r['shape']} | {r['baseline_MiB']:.0f} MiB | {r['ours_MiB']:.0f} MiB "
                         f"| {r['reduction']:.1f}x less |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="one repeat each (CI's smoke run; CPU shapes on CPU)")
    p.add_argument("--only", nargs="*", default=["lm_loss", "siglip_mem", "text_cache", "tokenize"])
    p.add_argument("--output_json", default=None, help="rows and the environment as JSON")
    p.add_argument("--output_md", default=None, help="the table as Markdown")
    args = p.parse_args(argv)
    if args.quick:
        args.repeats = 1
    torch.manual_seed(0)
    benches = {"lm_loss": bench_lm_loss, "siglip_mem": bench_siglip_memory, "text_cache": bench_text_cache,
               "tokenize": bench_tokenize}
    rows = [benches[name](args) for name in args.only]
    env = environment(args)
    table = markdown(env, rows)
    print(table)
    if args.output_json:
        Path(args.output_json).write_text(json.dumps({**env, "rows": rows}, indent=2))
    if args.output_md:
        Path(args.output_md).write_text(table + "\n")
    return rows


if __name__ == "__main__":
    main()
