"""Measure the repo's performance choices against the plain alternative, in one run.

Each peer row puts the project's code path beside a plain one (or a peer library's) doing the
same work on the same inputs, measured in one run on one device (named in the output). Times and
ratios hold for that device only: a CPU run of the tiny configs says nothing about a GPU's ratios
(other kernels, no bf16, per-op overhead that dominates tiny shapes). Ablation rows compare the
project with its own earlier or switched-off path (`comparison: ablation`), not with a peer.

    python scripts/benchmark.py --device cuda   # everything: real-size SigLIP / Gemma3 configs, bf16
    python scripts/benchmark.py --quick         # CPU smoke run: tiny configs, the same code paths
    python scripts/benchmark.py --output_json runs/benchmark.json --output_md runs/benchmark.md
    python scripts/benchmark.py --only siglip_loss --loss_sizes 1024 65536

Rows (timing, memory and the FLOP formulas of MFU: scripts/bench/bench_core.py; the peers:
scripts/bench/bench_peers.py):
  mfu_reference  the matmul rate of this device in this run (bf16 8192^3 on CUDA, fp32 on CPU):
                 the denominator of `mfu_vs_gemm`; MFU itself is against the datasheet dense bf16
                 peak (scripts/bench/bench_core.DEVICE_PEAKS, or --peak_tflops)
  stage0_step    Stage0's trainer step, each beside a peer doing the same work: frozen text with
                 cached features vs SiglipModel with its text tower frozen and the caption
                 embeddings computed once; text trained vs SiglipModel(..., return_loss=True).
                 img/s, peak memory, MFU. One row per --preset (SigLIP b16-224, l16-384,
                 so400m-384; tiny on CPU, timed in alternation)
  siglip_loss    forward + backward, B = 1k..64k on CUDA (1k, 8k on CPU --quick): the chunked
                 loss, the eager B x B loss, open_clip's SigLipLoss and siglip-kernel's fused
                 loss where installed: time, peak memory, max |grad - float32 reference grad|
  stage1_step    Stage1's step (frozen tower and LM, gradient through the LM to the projector;
                 gradient checkpointing; torch.compile on CUDA) vs a LLaVA-style step (image
                 embeddings concatenated, logits at every position): tokens/s, memory, MFU
  stage2_step    the same for Stage2, full fine-tune and LoRA (peft)
  generation     one image + a short question, batch 1: time to first token and ms per token,
                 dynamic cache vs static cache (+ torch.compile on CUDA)
  lm_loss        LM loss with logits only at supervised positions vs logits at every position
                 (Gemma3's 262,144-token vocabulary; an answer-length target after an image prompt)
  lm_head        LM head + cross-entropy at 8k supervised tokens: logits then CE vs Liger's fused
                 linear cross-entropy (liger-kernel, CUDA only), which never holds the logits
  siglip_mem     activation memory the SigLIP loss keeps for backward: chunked vs naive (B x B)
  text_cache     ablation: Stage0 step with the frozen text tower's caption embeddings cached vs
                 recomputed
  tokenize       ablation: Stage1/Stage2 sample token ids per second with the real Gemma 3
                 tokenizer (packaged 270M; a small one if it is not installed): special tokens
                 looked up once vs a get_vocab() dict rebuilt per lookup (the project's old path)
  data           ablation: the data-loading rows of scripts/bench/bench_data.py (the pre-resized cache
                 vs the project's own decode-and-resize per sample), when that file is present
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F

from scripts.bench.bench_core import FLOP_FORMULAS, datasheet_peak, is_cuda, matmul_rate, measure, memory_method


def _timeit(fn, repeats, device):
    return measure(fn, device=device, repeats=repeats)["time_s"]


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


def bench_lm_head(args):
    """The LM head + cross-entropy at 8k supervised tokens (Gemma3-1B width, 262k vocabulary):
    the project's logits-at-supervised-positions path against Liger's fused linear
    cross-entropy (`liger-kernel`, Triton, CUDA only), which never materialises the logits."""
    from scripts.bench.bench_core import attempt, measure
    cuda = is_cuda(args.device)
    tokens, width, vocab = (8192, 1152, 262144) if cuda else (256, 64, 262144)
    dtype = torch.bfloat16 if cuda else torch.float32
    torch.manual_seed(0)
    head = torch.nn.Linear(width, vocab, bias=False, device=args.device, dtype=dtype)
    h = torch.randn(tokens, width, device=args.device, dtype=dtype, requires_grad=True)
    target = torch.randint(0, vocab, (tokens,), device=args.device)

    def ours():
        F.cross_entropy(head(h).float(), target).backward()

    row = {"row": "lm_head", "shape": f"{tokens} supervised tokens, d={width}, vocab {vocab}, {str(dtype)[6:]}",
           "ours": attempt(lambda: measure(ours, device=args.device, repeats=args.repeats), args.device)}
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        row["liger"] = "not installed (pip install liger-kernel; Triton, CUDA only)"
        return row
    if not cuda:
        row["liger"] = "CUDA only"
        return row
    fused = LigerFusedLinearCrossEntropyLoss()

    def liger():
        fused(head.weight, h, target).backward()
    row["liger"] = attempt(lambda: measure(liger, device=args.device, repeats=args.repeats), args.device)
    if "time_s" in row["liger"] and "time_s" in row["ours"]:
        row["liger_speedup"] = row["ours"]["time_s"] / row["liger"]["time_s"]
    return row


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
        from scripts.demo.prepare_gemma270m import prepare_gemma270m
        path, which = prepare_gemma270m(), "Gemma 3 (262k vocab)"
    except ImportError:
        from scripts.demo.make_tiny_models import build_tiny_gemma3
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

    n, n_old = len(qa), 2 if args.quick else len(qa)  # the old path costs ~0.5 s a sample

    def old_path():  # what chat_token_ids did per call: two full vocabulary dicts per sample
        for q, a in qa[:n_old]:
            for _ in range(2):
                v = tok.get_vocab()
                v[START_OF_TURN], v[END_OF_TURN]
            build_example(tok, config, q, a)

    t_old = _timeit(old_path, max(1, args.repeats // 2), "cpu") / n_old
    t_new = _timeit(ours, args.repeats, "cpu") / n
    return {"row": "tokenize", "baseline_s": t_old, "ours_s": t_new, "speedup": t_old / t_new,
            "samples_per_s": 1 / t_new, "shape": f"per Stage2 sample, {which}"}


def bench_mfu_reference(args) -> dict:
    return {"row": "mfu_reference", **args.matmul}


def bench_data_rows(args) -> list[dict]:
    """The data-loading rows, from scripts/bench/bench_data.py where that file exists."""
    if importlib.util.find_spec("scripts.bench.bench_data") is None:
        return [{"row": "data", "skipped": "scripts/bench/bench_data.py is not present"}]
    from scripts.bench.bench_data import bench_data
    return bench_data(args)


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def _trained_dtypes(rows) -> str:
    """What the trainers' own steps trained in, read from the models they built (not assumed)."""
    seen = sorted({r["trained_dtype"] for row in rows for r in row.get("results", []) if r.get("trained_dtype")})
    return "/".join(seen) if seen else "(no trainer step ran)"


def environment(args, rows=()) -> dict:
    import platform

    import transformers
    cuda = is_cuda(args.device)
    return {"device": (torch.cuda.get_device_name() if cuda else
                       f"cpu ({torch.get_num_threads()} threads, {platform.processor() or platform.machine()})"),
            "torch": torch.__version__, "transformers": transformers.__version__, "cuda": torch.version.cuda,
            "peft": _version("peft"), "accelerate": _version("accelerate"),
            "open_clip": _version("open-clip-torch"), "siglip_kernel": _version("siglip-kernel"),
            "dtype": ("bfloat16 autocast" if cuda else "float32") + "; trained weights " + _trained_dtypes(rows)
            + ", frozen weights as stored",
            "attention": args.attn_implementation,
            "compile": "variants marked torch.compile" if cuda and not args.no_compile else "off",
            "timing": f"median of {args.repeats} after warm-up, " + ("CUDA events" if cuda else "wall clock"),
            "memory": memory_method(args.device), "quick": bool(args.quick),
            "peak_tflops": args.peak_flops / 1e12 if args.peak_flops else None, "peak_source": args.peak_source,
            "mfu_reference_tflops": args.matmul["flops_per_s"] / 1e12 if args.matmul else None,
            "note": None if cuda else CPU_NOTE,
            "flop_formulas": FLOP_FORMULAS, "row_seconds": getattr(args, "row_seconds", {})}


def mfu_peak(device, peak_tflops: float | None = None) -> tuple[float | None, str]:
    """(FLOP/s, source) of MFU's denominator: --peak_tflops, else the datasheet's dense bf16
    peak of this CUDA device, else (None, why not)."""
    if peak_tflops:
        return peak_tflops * 1e12, "--peak_tflops"
    if not is_cuda(device):
        return None, "no peak known: a CPU"
    name = torch.cuda.get_device_name(torch.device(device))
    sheet = datasheet_peak(name)
    if sheet is None:
        return None, f"no peak known for {name}: pass --peak_tflops"
    return sheet[0] * 1e12, f"datasheet dense bf16: {sheet[1]}"


CPU_NOTE = ("CPU run: float32, tiny configs of the same code paths. Its times and ratios describe this "
            "CPU only and do not carry over to a GPU (other kernels, no bf16, per-op overhead dominates "
            "tiny shapes); bash scripts/gpu_check.sh measures the GPU.")
# Rows whose baseline is the project's own earlier or switched-off path, not a peer's code.
ABLATIONS = {"text_cache", "tokenize"}


def comparison(row: dict) -> str:
    if row["row"] == "mfu_reference":
        return "reference"
    return "ablation" if row["row"] in ABLATIONS or row["row"].startswith("data") else "peer"


def _fmt(v, scale=1.0, fmt="{:.1f}", unit=""):
    return "-" if not isinstance(v, (int, float)) else fmt.format(v * scale) + unit


def _ms(v):
    return _fmt(v, 1e3, unit=" ms")


def _mib(v):
    return _fmt(v, fmt="{:.0f}", unit=" MiB")


def _x(*ratios):
    """'a x, b x' for numeric ratios; a string (why there is none) as it is."""
    return ", ".join(v if isinstance(v, str) else _fmt(v, fmt="{:.2f}", unit="x") for v in ratios)


def _markdown_results(rows, no_peak: bool = False) -> list[str]:
    steps = [r for r in rows if r["row"].endswith("_step") and "results" in r]
    out = []
    if steps:
        out += ["", "| benchmark | path | shape | step time | throughput | peak memory | MFU (datasheet peak) "
                "| MFU vs measured GEMM | vs peer (speed, memory) |", "|---|---|---|---|---|---|---|---|---|"]
        for row in steps:
            for r in row["results"]:
                vs = _x(r["speedup_vs_peer"], r.get("memory_vs_peer")) if "speedup_vs_peer" in r else "-"
                mfu = _fmt(r.get("mfu"), 100, unit="%") if r.get("mfu") is not None or not no_peak else "no peak known"
                out.append(f"| {row['row']} | {r['path']} | {row['shape']} | {r.get('error') or _ms(r.get('time_s'))} "
                           f"| {_fmt(r.get('throughput'), unit=' ' + row['unit'])} | {_mib(r.get('peak_MiB'))} "
                           f"| {mfu} | {_fmt(r.get('mfu_vs_gemm'), 100, unit='%')} | {vs} |")
    for row in (r for r in rows if r["row"] == "siglip_loss" and "results" in r):
        out += ["", f"siglip_loss: {row['shape']}; memory: {row['memory']}", "",
                "| B | implementation | time | peak memory | max abs grad diff (max abs grad) "
                "| this / ours: time, memory |", "|---|---|---|---|---|---|"]
        for r in row["results"]:
            ratio = _x(r["ours_speedup"], r.get("ours_memory_ratio")) if "ours_speedup" in r else "-"
            grad = f"{_fmt(r.get('grad_max_abs_diff'), fmt='{:.1e}')} ({_fmt(r.get('grad_max_abs_ref'), fmt='{:.1e}')})"
            out.append(f"| {r['B']} | {r['path']} | {r.get('error') or _ms(r.get('time_s'))} "
                       f"| {_mib(r.get('peak_MiB'))} | {grad} | {ratio} |")
    for row in (r for r in rows if r["row"] == "generation" and "results" in r):
        out += ["", f"generation: {row['shape']}", "",
                "| path | time to first token | per token | peak memory | vs dynamic cache: first token, per token |",
                "|---|---|---|---|---|"]
        for r in row["results"]:
            ratio = _x(r["ttft_speedup"], r["decode_speedup"]) if "decode_speedup" in r else "-"
            out.append(f"| {r['path']} | {r.get('error') or _ms(r.get('ttft_s'))} | {_ms(r.get('s_per_token'))} "
                       f"| {_mib(r.get('peak_MiB'))} | {ratio} |")
    return out


def markdown(env: dict, rows: list[dict]) -> str:
    head = (f"device: {env['device']}; torch {env['torch']}, transformers {env['transformers']}; "
            f"{env['dtype']}; attention {env['attention']}; compile {env['compile']}; {env['timing']}; "
            f"peak memory: {env['memory']}")
    lines = [head]
    if env.get("note"):
        lines += ["", env["note"]]
    if env.get("peak_tflops"):
        lines += ["", f"MFU: model FLOPs/s over the dense bf16 peak, {env['peak_tflops']:.4g} TFLOPS "
                      f"({env['peak_source']})"]
    else:
        lines += ["", f"MFU: {env.get('peak_source') or 'no peak known'}; the GEMM column only"]
    ref = next((r for r in rows if r["row"] == "mfu_reference" and "error" not in r), None)
    if ref:
        share = (f", {ref['flops_per_s'] / 1e12 / env['peak_tflops']:.0%} of the datasheet peak"
                 if env.get("peak_tflops") else "")
        lines += ["", f"mfu_reference: {ref['n']}^3 {ref['dtype']} matmul, {ref['flops_per_s'] / 1e12:.3g} TFLOP/s "
                      f"measured{share} (the denominator of MFU vs measured GEMM)"]
    lines += _markdown_results(rows, no_peak=not env.get("peak_tflops"))
    ratio_rows = [r for r in rows if "speedup" in r or "reduction" in r]
    for kind, title, plain in (("peer", "vs a plain alternative", "plain"),
                               ("ablation", "ablations: the project against its own earlier or switched-off path "
                                            "(not a peer)", "without")):
        these = [r for r in ratio_rows if r.get("comparison", comparison(r)) == kind]
        if not these:
            continue
        lines += ["", f"{title}:", "", f"| benchmark | comparison | shape | {plain} | ours | ratio |",
                  "|---|---|---|---|---|---|"]
        for r in these:
            if "speedup" in r:
                lines.append(f"| {r['row']} | {kind} | {r['shape']} | {r['baseline_s']*1e3:.1f} ms "
                             f"| {r['ours_s']*1e3:.1f} ms | {r['speedup']:.1f}x faster |")
            else:
                lines.append(f"| {r['row']} | {kind} | {r['shape']} | {r['baseline_MiB']:.0f} MiB "
                             f"| {r['ours_MiB']:.0f} MiB | {r['reduction']:.1f}x less |")
    known = {"mfu_reference", "siglip_loss", "generation"}
    for r in rows:  # failed rows, and rows of other modules (data): their fields as they are
        if r not in ratio_rows and (r["row"] not in known and not r["row"].endswith("_step") or "error" in r):
            lines += ["", f"| {r['row']} | " + "; ".join(f"{k}: {v}" for k, v in r.items() if k != "row") + " |"]
    return "\n".join(lines)


ROWS = ["mfu_reference", "siglip_loss", "stage0_step", "stage1_step", "stage2_step", "generation",
        "lm_loss", "lm_head", "siglip_mem", "text_cache", "tokenize", "data"]


def main(argv=None):
    from scripts.bench import bench_peers
    from scripts.demo.make_tiny_models import GEMMA3_PRESETS, SIGLIP_PRESETS
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per path (the median is reported)")
    p.add_argument("--quick", action="store_true", help="one repeat each (CI's smoke run; tiny configs on CPU)")
    p.add_argument("--only", nargs="*", default=ROWS, choices=ROWS)
    p.add_argument("--preset", nargs="+", choices=["tiny", *SIGLIP_PRESETS], default=None,
                   help="stage0_step's SigLIP architectures (default: all three on CUDA, tiny on CPU)")
    p.add_argument("--vlm_preset", choices=["tiny", *SIGLIP_PRESETS], default=None,
                   help="the VLM rows' vision tower (default: l16-384, the XraySigLIP shape, on CUDA)")
    p.add_argument("--lm_preset", choices=["tiny", *GEMMA3_PRESETS], default=None,
                   help="the VLM rows' Gemma3 (default: 1b on CUDA)")
    p.add_argument("--stage0_batch_size", type=int, default=None)
    p.add_argument("--stage1_batch_size", type=int, default=None)
    p.add_argument("--stage2_batch_size", type=int, default=None)
    p.add_argument("--loss_sizes", type=int, nargs="+", default=None, help="siglip_loss batch sizes")
    p.add_argument("--peak_tflops", type=float, default=None,
                   help="the device's dense bf16 peak in TFLOPS, for MFU (default: the datasheet table in "
                        "scripts/bench/bench_core.py, by device name)")
    p.add_argument("--attn_implementation", default="sdpa")
    p.add_argument("--no_compile", action="store_true", help="skip the torch.compile variants on CUDA")
    p.add_argument("--model_dir", default=None,
                   help="keep the config-built model folders here and reuse them (default: a temporary folder)")
    p.add_argument("--output_json", default=None, help="rows and the environment as JSON")
    p.add_argument("--output_md", default=None, help="the tables as Markdown")
    args = p.parse_args(argv)
    if is_cuda(args.device) and not torch.cuda.is_available():
        p.error(f"--device {args.device}: torch {torch.__version__} sees no CUDA GPU; run with --device cpu")
    if args.quick:
        args.repeats = 1
    cuda = is_cuda(args.device)
    args.preset = args.preset or (["b16-224", "l16-384", "so400m-384"] if cuda else ["tiny"])
    args.vlm_preset = args.vlm_preset or ("l16-384" if cuda else "tiny")
    args.lm_preset = args.lm_preset or ("1b" if cuda else "tiny")
    torch.manual_seed(0)
    args.matmul = None
    if {"mfu_reference", "stage0_step", "stage1_step", "stage2_step"} & set(args.only):
        n, dtype = (8192, torch.bfloat16) if cuda else (1024, torch.float32)
        args.matmul = matmul_rate(args.device, n=n, dtype=dtype, repeats=10)
    args.gemm_flops = args.matmul["flops_per_s"] if args.matmul else None
    args.peak_flops, args.peak_source = mfu_peak(args.device, args.peak_tflops)
    benches = {"mfu_reference": bench_mfu_reference, "siglip_loss": bench_peers.bench_siglip_loss,
               "stage0_step": bench_peers.bench_stage0_step, "stage1_step": bench_peers.bench_stage1_step,
               "stage2_step": bench_peers.bench_stage2_step, "generation": bench_peers.bench_generation,
               "lm_loss": bench_lm_loss, "lm_head": bench_lm_head, "siglip_mem": bench_siglip_memory, "text_cache": bench_text_cache,
               "tokenize": bench_tokenize, "data": bench_data_rows}
    import shutil

    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # one bar per model load would bury the tables
    args.models = bench_peers.ModelFolders(args.model_dir)
    rows, args.row_seconds, failed = [], {}, []
    try:
        for name in args.only:
            t = time.perf_counter()
            try:
                got = benches[name](args)
            except Exception as e:  # one broken row must not cost the others' (GPU) results
                traceback.print_exc()
                got = {"row": name, "error": f"{type(e).__name__}: {e}".splitlines()[0]}
                failed.append(f"scripts/benchmark.py: row {name} failed ({got['error']}); the traceback is "
                              f"above, rerun it alone with --only {name}")
            for r in got if isinstance(got, list) else [got]:
                r.setdefault("comparison", comparison(r))
                rows.append(r)
            args.row_seconds[name] = round(time.perf_counter() - t, 1)
    finally:
        if args.model_dir is None:
            shutil.rmtree(args.models.root, ignore_errors=True)
    env = environment(args, rows)
    table = markdown(env, rows)
    print(table)
    if args.output_json:
        Path(args.output_json).write_text(json.dumps({**env, "rows": rows}, indent=2, default=str))
    if args.output_md:
        Path(args.output_md).write_text(table + "\n")
    for line in failed:
        print(line, file=sys.stderr)
    return rows


if __name__ == "__main__":
    main()
