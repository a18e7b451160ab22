"""The benchmark rows that put the project's code path beside a peer's, measured in one run.

Every "ours" path is the project's own step: the Stage trainers are built from their own
argument parsers and the step is their method (`_step_frozen_text` / `_step_trained_text`
plus `OptimizerStep.finish` for Stage0, `_optimizer_step` for Stage1 and Stage2), on models
assembled by `Stage0.towers.build_model` and `vlm.build_vlm` from folders written by
scripts/demo/make_tiny_models.py (real architectures from configs, random weights: speed and memory
do not depend on the weights). The peers are the plain loops people write:

    stage0_step   for the frozen-text step, SiglipModel's forward lines with the text tower frozen and
                  its caption embeddings computed once; for the trained-text step,
                  SiglipModel(input_ids, pixel_values, return_loss=True).loss.backward()
    siglip_loss   the eager B x B loss; open_clip's SigLipLoss; siglip-kernel's fused loss
    stage1/2      LLaVA-style: image embeddings concatenated with the text embeddings, logits
                  at every position, transformers' ForCausalLMLoss over the full vocabulary
    generation    generate() with the default dynamic cache (vs a static cache, + torch.compile)

Row dicts hold `results` (one per path: time_s, peak_MiB, throughput, flops, mfu) and each
"ours" result its ratios to the peer it names (`vs`): speedup_vs_peer = peer time / our
time, memory_vs_peer = peer peak / our peak.
"""
from __future__ import annotations

import importlib.util
import math
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from scripts.bench.bench_core import (
    LivePeak,
    attempt,
    free,
    frozen_flops,
    grad_through_flops,
    is_cuda,
    lm_body_params,
    lm_head_flops,
    measure,
    measure_interleaved,
    memory_ratio,
    n_params,
    sync,
    tower_flops,
    trained_flops,
)
from scripts.demo.make_tiny_models import GEMMA3_PRESETS, SIGLIP_PRESETS, build_tiny_gemma3, build_tiny_siglip
from training.precision import trained_dtypes

TEXTS = ["No acute cardiopulmonary process.", "Small left pleural effusion with adjacent atelectasis.",
         "Cardiomegaly without pulmonary edema.", "Is there a pneumothorax on the right side?",
         "The lungs are clear. No pleural effusion or pneumothorax.", "Describe the findings of this radiograph.",
         "Endotracheal tube terminates 4 cm above the carina.", "Is the heart size normal?"]
# The same code paths at a size two CPU cores run in seconds (--quick, and CPU runs).
TINY_SIGLIP = dict(image_size=64, patch_size=16, hidden_size=64, intermediate_size=256, num_layers=2, num_heads=2,
                   text_len=16)
TINY_GEMMA = dict(hidden_size=64, intermediate_size=256, num_layers=2, num_heads=2, head_dim=32,
                  model_vocab_size=262144)  # Gemma 3's vocabulary: the LM head is the point of the peer
STAGE0_BATCH = {"tiny": 8, "b16-224": 128, "l16-384": 32, "so400m-384": 32}
VLM_BATCH = {"cpu": (2, 2), "cuda": (16, 8)}  # Stage1, Stage2 per-process batch
CAPTION_TOKENS = {"cpu": 16, "cuda": 64}
LORA_R = 16


# ---------------------------------------------------------------- models and arguments

class ModelFolders:
    """SigLIP / Gemma3 folders built once per preset under `root`, loaded by the project's loaders."""

    def __init__(self, root=None):
        self.root = Path(root or tempfile.mkdtemp(prefix="bench_models_"))

    def siglip(self, preset: str) -> Path:
        out = self.root / f"siglip-{preset}"
        if not (out / "config.json").is_file():
            kw = TINY_SIGLIP if preset == "tiny" else SIGLIP_PRESETS[preset]
            build_tiny_siglip(out, TEXTS, **kw)
        return out

    def gemma(self, preset: str) -> Path:
        out = self.root / f"gemma3-{preset}"
        if not (out / "config.json").is_file():
            if preset == "tiny":
                build_tiny_gemma3(out, TEXTS, **TINY_GEMMA)
            else:  # stored in bf16 as the released Gemma 3 checkpoints are
                build_tiny_gemma3(out, TEXTS, dtype=torch.bfloat16, **GEMMA3_PRESETS[preset])
        return out


def _accelerator(device):
    """A fresh Accelerator (accelerate keeps one global state; each trainer gets its own)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    return Accelerator(cpu=not is_cuda(device), mixed_precision="bf16" if is_cuda(device) else "no")


def _stage_flags(args, out_dir, batch_size, extra=()) -> list[str]:
    return ["--output_dir", str(out_dir), "--batch_size", str(batch_size), "--num_workers", "0",
            "--mixed_precision", "bf16" if is_cuda(args.device) else "no", "--lr_scheduler", "constant",
            "--warmup_steps", "0", "--max_steps", "1000000", "--report_to", "none",
            "--attn_implementation", args.attn_implementation, *extra]


def _to(batch: dict, device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def _warmup(args, compiled=False) -> int:
    return 3 if compiled else (2 if is_cuda(args.device) else 1)


def _complete(results: list[dict], samples: int, peak_flops: float | None,
              gemm_flops: float | None = None) -> list[dict]:
    """Throughput and MFU of every result (against the datasheet peak; `mfu_vs_gemm` against the
    GEMM rate measured in this run); speed and memory ratios of each to its peer (`vs`)."""
    by_path = {r["path"]: r for r in results}
    for r in results:
        if "time_s" in r:
            r["throughput"] = samples / r["time_s"]
            if r.get("flops"):
                r["mfu"] = r["flops"] / r["time_s"] / peak_flops if peak_flops else None
                if gemm_flops:
                    r["mfu_vs_gemm"] = r["flops"] / r["time_s"] / gemm_flops
        peer = by_path.get(r.get("vs"))
        if peer is None or "time_s" not in r:
            continue
        if "time_s" not in peer:
            r["speedup_vs_peer"] = f"peer: {peer.get('error')}"
            continue
        r["speedup_vs_peer"] = peer["time_s"] / r["time_s"]
        mem = memory_ratio(peer.get("peak_MiB"), r.get("peak_MiB"))
        if mem is not None:
            r["memory_vs_peer"] = mem
    return results


# ---------------------------------------------------------------- stage0_step

class _Pairs(torch.utils.data.Dataset):
    """n image-caption pairs with distinct captions, as Stage0's dataset gives them."""

    def __init__(self, n, image_size, text_len, vocab):
        g = torch.Generator().manual_seed(0)
        self.pixel_values = torch.randn(n, 3, image_size, image_size, generator=g)
        self.input_ids = torch.randint(3, vocab, (n, text_len), generator=g)
        self.attention_mask = torch.ones_like(self.input_ids)
        self.caption_ids = torch.arange(n)

    def __len__(self):
        return len(self.input_ids)

    def __getitem__(self, i):
        return {"pixel_values": self.pixel_values[i], "input_ids": self.input_ids[i],
                "attention_mask": self.attention_mask[i], "caption_id": i, "index": i}


def _stage0_ours(args, folder, batch_size, trained_text: bool):
    """The trainer's own step on one window: (run, facts, cleanup)."""
    from Stage0.dataset import collate_fn
    from Stage0.towers import build_model
    from Stage0.train_vision_encoder_stage0 import parse_args
    from Stage0.trainer import VisionEncoderTrainerStage0
    out = tempfile.mkdtemp(prefix="bench_stage0_")
    sargs = parse_args(["--model_name", str(folder), "--train_json", "unused.json", "--freeze_logit_scale",
                        *(["--no_freeze_text_encoder"] if trained_text else []),
                        *_stage_flags(args, out, batch_size)])
    model, tokenizer, processor = build_model(sargs)
    image_cfg = model.image.backbone.config
    text_cfg = model.text.backbone.config
    ds = _Pairs(batch_size, image_cfg.image_size, text_cfg.max_position_embeddings, text_cfg.vocab_size)
    trainer = VisionEncoderTrainerStage0(sargs, _accelerator(args.device), model, tokenizer, processor, ds)
    trainer._set_modes()
    window = [_to(collate_fn([ds[i] for i in range(batch_size)]), args.device)]
    step = trainer._step_trained_text if trained_text else trainer._step_frozen_text

    def run():
        step(window)
        trainer.stepper.finish(0)
    flops = batch_size * (tower_flops(model.image.backbone, "trained")
                          + (tower_flops(model.text.backbone, "trained") if trained_text else 0))
    facts = {"flops": flops, "trained_dtype": trained_dtypes(model), "trained_params": _trained(model)}
    return run, facts, lambda: shutil.rmtree(out, ignore_errors=True)


def _trained(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _pooled(out):
    """get_*_features returns the embeddings (transformers 4) or an output holding them (5)."""
    return out if torch.is_tensor(out) else out.pooler_output


def siglip_model_loss(logits_per_text):
    """The loss lines of transformers' SiglipModel.forward(return_loss=True) (big_vision's)."""
    eye = torch.eye(logits_per_text.size(0), device=logits_per_text.device)
    m1_diag1 = -torch.ones_like(logits_per_text) + 2 * eye
    return -F.logsigmoid(m1_diag1 * logits_per_text).sum(dim=-1).mean()


def _stage0_peer(args, folder, batch_size, trained_text: bool):
    """The plain loop doing the work ours does: the logit scale and bias frozen as ours are
    (--freeze_logit_scale); with a frozen text tower, SiglipModel's own forward lines with the
    caption embeddings computed once under no_grad (what anyone freezing it would write), else
    SiglipModel(input_ids, pixel_values, return_loss=True) with both towers training."""
    from transformers import SiglipModel
    model = SiglipModel.from_pretrained(folder, attn_implementation=args.attn_implementation).to(args.device)
    model.train()
    model.logit_scale.requires_grad_(False)
    model.logit_bias.requires_grad_(False)
    cfg = model.config
    ds = _Pairs(batch_size, cfg.vision_config.image_size, cfg.text_config.max_position_embeddings,
                cfg.text_config.vocab_size)
    px, ids = ds.pixel_values.to(args.device), ds.input_ids.to(args.device)
    autocast = lambda: torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16,  # noqa: E731
                                      enabled=is_cuda(args.device))
    text = None
    if not trained_text:
        model.text_model.requires_grad_(False)
        model.text_model.eval()
        with torch.no_grad(), autocast():
            text = _pooled(model.get_text_features(input_ids=ids))
            text = text / text.norm(p=2, dim=-1, keepdim=True)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.05)

    def run():
        with autocast():
            if trained_text:
                loss = model(input_ids=ids, pixel_values=px, return_loss=True).loss
            else:
                img = _pooled(model.get_image_features(pixel_values=px))
                img = img / img.norm(p=2, dim=-1, keepdim=True)
                loss = siglip_model_loss(text @ img.t() * model.logit_scale.exp() + model.logit_bias)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    flops = batch_size * (tower_flops(model.vision_model, "trained")
                          + (tower_flops(model.text_model, "trained") if trained_text else 0))
    return run, {"flops": flops, "trained_params": _trained(model)}, lambda: None


STAGE0_CPU_ROUNDS = 15  # tiny steps take milliseconds; a handful of alternations is not a median


def _measure_pair(args, builders: dict) -> dict[str, dict]:
    """{path: result} for (run, facts, cleanup) builders. On CUDA one model at a time (the
    absolute peak memory would count the other's weights); on CPU both built, then timed in
    alternation (measure_interleaved) with at least STAGE0_CPU_ROUNDS runs each."""
    out = {}
    if is_cuda(args.device):
        for path, build in builders.items():
            def one(build=build):
                run, facts, cleanup = build()
                try:
                    return {**measure(run, device=args.device, repeats=args.repeats, warmup=_warmup(args)), **facts}
                finally:
                    cleanup()
            out[path] = attempt(one, args.device)
        return out
    built = {path: build() for path, build in builders.items()}
    try:
        timed = measure_interleaved({p: b[0] for p, b in built.items()}, device=args.device,
                                    repeats=max(args.repeats, STAGE0_CPU_ROUNDS), warmup=_warmup(args))
        return {p: {**timed[p], **built[p][1]} for p in built}
    finally:
        for _, _, cleanup in built.values():
            cleanup()
        free(args.device)


def bench_stage0_step(args) -> list[dict]:
    rows = []
    for preset in args.preset:
        folder = args.models.siglip(preset)
        b = args.stage0_batch_size or STAGE0_BATCH[preset]
        results = []
        for trained_text, peer, ours in (
                (False, "peer: HF SiglipModel, text tower frozen (no_grad, caption embeddings computed once)",
                 "ours: frozen text, cached features"),
                (True, "peer: HF SiglipModel(return_loss=True), both towers trained", "ours: text tower trained")):
            got = _measure_pair(args, {
                peer: lambda t=trained_text: _stage0_peer(args, folder, b, t),
                ours: lambda t=trained_text: _stage0_ours(args, folder, b, t)})
            results += [{"path": peer, "role": "peer", **got[peer]},
                        {"path": ours, "role": "ours", "vs": peer, **got[ours]}]
        kw = TINY_SIGLIP if preset == "tiny" else SIGLIP_PRESETS[preset]
        patches = (kw["image_size"] // kw["patch_size"]) ** 2
        rows.append({"row": "stage0_step", "preset": preset, "unit": "img/s", "comparison": "peer",
                     "shape": f"SigLIP {preset}, B={b}, {patches} patches + {kw.get('text_len', 64)} text tokens; "
                              "logit scale and bias frozen in both",
                     "results": _complete(results, b, args.peak_flops, args.gemm_flops)})
    return rows


# ---------------------------------------------------------------- siglip_loss

def _open_clip_loss():
    """open_clip's SigLipLoss, or the reason it is unavailable. Its package import needs
    torchvision; open_clip/loss.py itself needs only torch, so it is loaded by file path."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None:
        return None, "not installed (pip install --no-deps open-clip-torch)"
    try:
        from open_clip.loss import SigLipLoss
    except ImportError:
        path = Path(next(iter(spec.submodule_search_locations))) / "loss.py"
        mod_spec = importlib.util.spec_from_file_location("_open_clip_loss", path)
        mod = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(mod)
        SigLipLoss = mod.SigLipLoss
    loss = SigLipLoss()
    # open_clip takes t itself (not log t), as its models return logit_scale.exp()
    return (lambda x, y, log_t, b: loss(x, y, log_t.exp(), b)), None


def _siglip_kernel_loss(device):
    if importlib.util.find_spec("siglip_kernel") is None:
        return None, "not installed (pip install siglip-kernel; Triton, CUDA only)"
    if not is_cuda(device):
        return None, "CUDA only (Triton kernels)"
    from siglip_kernel import fused_siglip_loss
    return fused_siglip_loss, None


OURS_LOSS, EAGER = "ours: chunked (losses.siglip_loss)", "eager full matrix (losses.siglip_loss_reference)"


def _loss_impls(device) -> dict:
    """The eager loss first: with float32 features its gradients are the reference."""
    from losses import siglip_loss, siglip_loss_reference
    oc, oc_why = _open_clip_loss()
    sk, sk_why = _siglip_kernel_loss(device)
    return {EAGER: (siglip_loss_reference, None), OURS_LOSS: (siglip_loss, None),
            "open_clip SigLipLoss": (oc, oc_why), "siglip-kernel fused_siglip_loss": (sk, sk_why)}


def _loss_grads(fn, x, y, device):
    log_t = torch.tensor(math.log(10.0), device=device, requires_grad=True)
    bias = torch.tensor(-10.0, device=device, requires_grad=True)
    x, y = x.detach().requires_grad_(), y.detach().requires_grad_()
    fn(x, y, log_t, bias).backward()
    return x.grad.float(), y.grad.float()


def bench_siglip_loss(args) -> dict:
    cuda = is_cuda(args.device)
    if args.loss_sizes:
        sizes = args.loss_sizes
    else:
        sizes = [2 ** k for k in range(10, 17)] if cuda else ([1024, 8192] if args.quick else [1024, 4096, 8192])
    d = 1024 if cuda else 128
    dtype = torch.bfloat16 if cuda else torch.float32  # what the towers emit under bf16 autocast
    impls = _loss_impls(args.device)
    from losses import siglip_loss_reference
    results = []
    for n in sizes:
        g = torch.Generator(device=args.device).manual_seed(n)
        x0 = F.normalize(torch.randn(n, d, device=args.device, generator=g), dim=-1)
        y0 = F.normalize(torch.randn(n, d, device=args.device, generator=g), dim=-1)
        ref = None
        if dtype != torch.float32:  # else the eager path's own gradients are the float32 reference
            ref = attempt(lambda: {"grads": _loss_grads(siglip_loss_reference, x0, y0, args.device)},
                          args.device).get("grads")
        for name, (fn, why) in impls.items():
            r = {"path": name, "B": n, "role": "ours" if name.startswith("ours") else "peer"}
            if fn is None:
                results.append({**r, "error": why})
                continue
            x = x0.to(dtype).requires_grad_()
            y = y0.to(dtype).requires_grad_()
            log_t = torch.tensor(math.log(10.0), device=args.device, requires_grad=True)
            bias = torch.tensor(-10.0, device=args.device, requires_grad=True)

            def run(fn=fn, x=x, y=y, log_t=log_t, bias=bias):
                for t in (x, y, log_t, bias):
                    t.grad = None
                fn(x, y, log_t, bias).backward()
            r.update(attempt(lambda: measure(run, device=args.device, repeats=args.repeats, warmup=1,
                                             relative=True), args.device))
            if "time_s" in r and name == EAGER and dtype == torch.float32:
                ref = (x.grad.float(), y.grad.float())
            if "time_s" in r and ref is not None:
                r["grad_max_abs_diff"] = max((x.grad.float() - ref[0]).abs().max().item(),
                                             (y.grad.float() - ref[1]).abs().max().item())
                r["grad_max_abs_ref"] = max(ref[0].abs().max().item(), ref[1].abs().max().item())
            results.append(r)
            del x, y
            free(args.device)
        del x0, y0, ref
        free(args.device)
    ours = OURS_LOSS
    for r in results:  # ours against each other implementation at the same B
        mine = next((o for o in results if o["path"] == ours and o["B"] == r["B"]), None)
        if r["path"] == ours or mine is None or "time_s" not in mine:
            continue
        if "time_s" in r:
            r["ours_speedup"] = r["time_s"] / mine["time_s"]
            mem = memory_ratio(r.get("peak_MiB"), mine.get("peak_MiB"))
            if mem is not None:
                r["ours_memory_ratio"] = mem
    return {"row": "siglip_loss", "shape": f"B in {sizes}, D={d}, {str(dtype).replace('torch.', '')} features, "
            "forward + backward", "memory": "peak above the inputs", "results": results}


# ---------------------------------------------------------------- stage1_step / stage2_step

def _vlm(args, dtype=None):
    from vlm import build_vlm
    return build_vlm(str(args.models.siglip(args.vlm_preset)), str(args.models.gemma(args.lm_preset)),
                     torch_dtype=dtype)


def _caption_ids(tokenizer, n: int) -> list[int]:
    ids = tokenizer(" ".join(TEXTS * 8), add_special_tokens=False)["input_ids"]
    return ids[: n - 1] + [tokenizer.eos_token_id]


def _stage1_batch(model, tokenizer, batch_size, caption_tokens) -> dict:
    from Stage1.dataset import IGNORE_INDEX, CaptionCollator
    cfg = model.config
    prompt = [tokenizer.bos_token_id] + [cfg.image_token_index] * cfg.image_seq_length
    target = _caption_ids(tokenizer, caption_tokens)
    size = cfg.vision_config.image_size
    items = [{"input_ids": torch.tensor(prompt + target), "labels": torch.tensor([IGNORE_INDEX] * len(prompt) + target),
              "pixel_values": torch.randn(3, size, size)} for _ in range(batch_size)]
    return CaptionCollator(tokenizer.pad_token_id)(items)


def _stage2_batch(model, tokenizer, batch_size, answer_tokens) -> dict:
    from Stage2.dataset import VQACollator, build_example, pad_token_id
    answer = tokenizer.decode(_caption_ids(tokenizer, answer_tokens)[:-1])
    ids, labels = build_example(tokenizer, model.config, TEXTS[3], answer, max_a_len=answer_tokens)
    size = model.config.vision_config.image_size
    items = [{"input_ids": torch.tensor(ids), "labels": torch.tensor(labels),
              "pixel_values": torch.randn(3, size, size)} for _ in range(batch_size)]
    return VQACollator(pad_token_id(tokenizer))(items)


def llava_concat_loss(vlm, input_ids, attention_mask, pixel_values, labels):
    """The plain LLaVA-style loss: the projected image features concatenated with the text
    embeddings around the placeholder run, logits at every position, transformers' causal-LM
    cross-entropy over the whole vocabulary."""
    from transformers.loss.loss_utils import ForCausalLMLoss
    cfg, m = vlm.config, vlm.model
    out = m.get_image_features(pixel_values=pixel_values, vision_feature_layer=cfg.vision_feature_layer,
                               vision_feature_select_strategy=cfg.vision_feature_select_strategy)
    feats = getattr(out, "pooler_output", out)
    feats = torch.stack(list(feats)) if not torch.is_tensor(feats) else feats
    start = int((input_ids[0] == cfg.image_token_index).nonzero()[0])  # the same prompt in every row
    embed = m.get_input_embeddings()
    before, after = embed(input_ids[:, :start]), embed(input_ids[:, start + feats.shape[1]:])
    embeds = torch.cat([before, feats.to(before.dtype), after], dim=1)
    hidden = m.language_model(inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False).last_hidden_state
    logits = vlm.lm_head(hidden)
    return ForCausalLMLoss(logits, labels, vocab_size=logits.shape[-1])


def _llava_step(vlm, batch, params, optimizer, autocast):
    def run():
        with autocast():
            loss = llava_concat_loss(vlm, batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
                                     batch["labels"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return run


def _vlm_flops(vlm, batch, *, projector: str, lm: str, head: str, every_position: bool) -> int:
    """Model FLOPs of one VLM step: frozen vision tower, the projector (`trained` / `frozen`),
    the LM (`trained` / `grad_through` / `lora`), the head (`trained` / `grad_through`)."""
    cfg, m = vlm.config, vlm.model
    b, seq = batch["input_ids"].shape
    img = b * cfg.image_seq_length
    n_lora = sum(p.numel() for name, p in m.language_model.named_parameters() if "lora_" in name)
    n_lm = lm_body_params(m.language_model) - n_lora
    tokens = b * seq
    supervised = int((batch["labels"][:, 1:] != -100).sum())
    flops = frozen_flops(n_params(m.vision_tower), img)
    proj = n_params(m.multi_modal_projector)
    flops += trained_flops(proj, img) if projector == "trained" else frozen_flops(proj, img)
    if lm == "trained":
        flops += trained_flops(n_lm, tokens)
    else:
        flops += grad_through_flops(n_lm, tokens) + (trained_flops(n_lora, tokens) if lm == "lora" else 0)
    text = cfg.text_config
    return flops + lm_head_flops(text.vocab_size, text.hidden_size, tokens if every_position else supervised, head)


def _stage1_run(args, flags, with_peer: bool) -> list[dict]:
    from torch.utils.data import DataLoader

    from Stage1.projector_trainer import ProjectionTrainerStage1
    from Stage1.train_projection_stage1 import parse_args
    b = args.stage1_batch_size or VLM_BATCH[torch.device(args.device).type][0]
    with tempfile.TemporaryDirectory() as out:
        sargs = parse_args(["--image_root", ".", "--train_json", "unused.json", *_stage_flags(args, out, b, flags)])
        model, tokenizer, processor = _vlm(args, torch.bfloat16 if is_cuda(args.device) else None)
        batch = _stage1_batch(model, tokenizer, b, CAPTION_TOKENS[torch.device(args.device).type])
        acc = _accelerator(args.device)
        loader = DataLoader(list(range(b)), batch_size=b)  # only its length is read
        trainer = ProjectionTrainerStage1(sargs, acc, model, tokenizer, processor, loader)
        batch = _to(batch, args.device)
        kw = dict(device=args.device, repeats=args.repeats, warmup=_warmup(args, "--torch_compile" in flags))
        ours = measure(lambda: trainer._optimizer_step([batch], 0), **kw)
        ours["flops"] = _vlm_flops(model, batch, projector="trained", lm="grad_through", head="grad_through",
                                   every_position=False)
        ours["tokens_per_step"] = batch["input_ids"].numel()
        ours["trained_dtype"] = trained_dtypes(model)
        if not with_peer:
            return [ours]
        peer = attempt(lambda: measure(_llava_step(model, batch, trainer.params, trainer.optimizer, acc.autocast),
                                       **kw), args.device)
        peer["flops"] = _vlm_flops(model, batch, projector="trained", lm="grad_through", head="grad_through",
                                   every_position=True)
        return [ours, peer]


def _variants(args) -> list[tuple[str, list[str]]]:
    v = [("", []), (" + gradient checkpointing", ["--gradient_checkpointing"])]
    if is_cuda(args.device) and not args.no_compile:
        v.append((" + torch.compile", ["--torch_compile"]))
    return v


def _drop_compiled(flags) -> None:
    """Compiled graphs keep their model's weights alive; the next variant builds its own."""
    if "--torch_compile" in flags:
        torch._dynamo.reset()


def _shape(args, batch_size, stage) -> str:
    lm = f"Gemma3 {args.lm_preset}" + (" (262k vocab)" if args.lm_preset == "tiny" else "")
    return f"SigLIP {args.vlm_preset} + {lm}, B={batch_size}, {stage}"


def bench_stage1_step(args) -> dict:
    peer = "peer: LLaVA-style concat, logits at every position"
    results = []
    for i, (suffix, flags) in enumerate(_variants(args)):
        got = attempt(lambda: {"runs": _stage1_run(args, flags, with_peer=i == 0)}, args.device)
        _drop_compiled(flags)
        if "runs" not in got:
            results.append({"path": "ours" + suffix, "role": "ours", "vs": peer, **got})
            continue
        results.append({"path": "ours" + suffix, "role": "ours", "vs": peer, **got["runs"][0]})
        if i == 0:
            results.insert(0, {"path": peer, "role": "peer", **got["runs"][1]})
    b = args.stage1_batch_size or VLM_BATCH[torch.device(args.device).type][0]
    tokens = _tokens_per_step(results)
    return {"row": "stage1_step", "unit": "tokens/s", "tokens_per_step": tokens,
            "shape": _shape(args, b, f"{tokens // b} tokens per sample; projector trains, tower and LM frozen"),
            "results": _complete(results, tokens, args.peak_flops, args.gemm_flops)}


def _stage2_run(args, flags, with_peer: bool) -> list[dict]:
    from torch.utils.data import DataLoader

    from Stage2.train_vqa_stage2 import parse_args
    from Stage2.trainer import VQATrainerStage2
    b = args.stage2_batch_size or VLM_BATCH[torch.device(args.device).type][1]
    with tempfile.TemporaryDirectory() as out:
        sargs = parse_args(["--image_root", ".", "--train_json", "unused.json", *_stage_flags(args, out, b, flags)])
        model, tokenizer, processor = _vlm(args)
        batch = _stage2_batch(model, tokenizer, b, CAPTION_TOKENS[torch.device(args.device).type])
        acc = _accelerator(args.device)
        loader = DataLoader(list(range(b)), batch_size=b)  # only its length is read
        trainer = VQATrainerStage2(sargs, acc, model, tokenizer, processor, loader)
        trainer._set_modes()
        batch = _to(batch, args.device)
        kw = dict(device=args.device, repeats=args.repeats, warmup=_warmup(args, "--torch_compile" in flags))
        lm = "lora" if sargs.lora_r else "trained"
        head = "grad_through" if sargs.lora_r else "trained"
        ours = measure(lambda: trainer._optimizer_step([batch], 0), **kw)
        ours["flops"] = _vlm_flops(model, batch, projector="frozen", lm=lm, head=head, every_position=False)
        ours["tokens_per_step"] = batch["input_ids"].numel()
        ours["trained_dtype"] = trained_dtypes(model)
        if not with_peer:
            return [ours]
        peer = attempt(lambda: measure(_llava_step(model, batch, trainer.params, trainer.optimizer, acc.autocast),
                                       **kw), args.device)
        peer["flops"] = _vlm_flops(model, batch, projector="frozen", lm=lm, head=head, every_position=True)
        return [ours, peer]


def bench_stage2_step(args) -> dict:
    results = []
    for mode, mode_flags in (("full fine-tune", []), (f"LoRA r={LORA_R}", ["--lora_r", str(LORA_R)])):
        peer = f"peer ({mode}): LLaVA-style concat, logits at every position"
        for i, (suffix, flags) in enumerate(_variants(args)):
            path = f"ours ({mode}){suffix}"
            got = attempt(lambda: {"runs": _stage2_run(args, mode_flags + flags, with_peer=i == 0)}, args.device)
            _drop_compiled(flags)
            if "runs" not in got:
                results.append({"path": path, "role": "ours", "vs": peer, **got})
                continue
            if i == 0:
                results.append({"path": peer, "role": "peer", **got["runs"][1]})
            results.append({"path": path, "role": "ours", "vs": peer, **got["runs"][0]})
    b = args.stage2_batch_size or VLM_BATCH[torch.device(args.device).type][1]
    tokens = _tokens_per_step(results)
    return {"row": "stage2_step", "unit": "tokens/s", "tokens_per_step": tokens,
            "shape": _shape(args, b, f"{tokens // b} tokens per sample (image, question, answer)"),
            "results": _complete(results, tokens, args.peak_flops, args.gemm_flops)}


def _tokens_per_step(results) -> int:
    """Tokens in one step's batch (image tokens included), as the runs that completed saw it."""
    seen = [r.pop("tokens_per_step") for r in results if "tokens_per_step" in r]
    return seen[0] if seen else 0


# ---------------------------------------------------------------- generation

class _TokenClock:
    """A generate() streamer that timestamps every put: the prompt first, then each new token
    (generate moves each token to the CPU before the put, so the token is complete)."""

    def __init__(self, device):
        self.cuda, self.marks = is_cuda(device), []

    def now(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def put(self, value):
        self.marks.append(self.now())

    def end(self):
        pass

    def seconds(self, a, b) -> float:
        return a.elapsed_time(b) / 1e3 if self.cuda else b - a


def _generate_once(model, inputs, new_tokens, device, kw) -> tuple[float, float]:
    clock = _TokenClock(device)
    start = clock.now()
    with torch.inference_mode():
        model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                       streamer=clock, **kw)
    sync(device)
    first, last = clock.marks[1], clock.marks[-1]  # marks[0]: the prompt
    return clock.seconds(start, first), clock.seconds(first, last) / max(len(clock.marks) - 2, 1)


def bench_generation(args) -> dict:
    import statistics

    from Stage2.dataset import build_prompt
    cuda = is_cuda(args.device)
    model, tokenizer, _ = _vlm(args, torch.bfloat16 if cuda else None)
    model.to(args.device).eval()
    ids = torch.tensor([build_prompt(tokenizer, model.config, TEXTS[3])], device=args.device)
    size = model.config.vision_config.image_size
    dtype = next(model.parameters()).dtype
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
              "pixel_values": torch.randn(1, 3, size, size, device=args.device, dtype=dtype)}
    new_tokens = 32 if cuda else 8
    base = "eager, dynamic cache (generate's default)"
    variants = [(base, {}, 1), ("static cache", {"cache_implementation": "static", "disable_compile": True}, 1)]
    if cuda and not args.no_compile:  # generate compiles the decoding step itself for a static cache on CUDA
        variants.append(("static cache + torch.compile", {"cache_implementation": "static"}, 3))
    results = []
    for name, kw, warmup in variants:
        def run(kw=kw, warmup=warmup):
            for _ in range(warmup):
                _generate_once(model, inputs, new_tokens, args.device, kw)
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            got = [_generate_once(model, inputs, new_tokens, args.device, kw) for _ in range(args.repeats)]
            if cuda:
                peak = torch.cuda.max_memory_allocated()
            else:
                with LivePeak() as live:
                    _generate_once(model, inputs, new_tokens, args.device, kw)
                peak = live.peak
            return {"ttft_s": statistics.median(g[0] for g in got),
                    "s_per_token": statistics.median(g[1] for g in got), "peak_MiB": peak / 2 ** 20}
        role = {"role": "baseline"} if name == base else {"role": "variant", "vs": base}
        results.append({"path": name, **role, **attempt(run, args.device)})
    _drop_compiled(["--torch_compile"] if len(variants) > 2 else [])
    by = {r["path"]: r for r in results}
    for r in results:
        if r["path"] != base and "s_per_token" in r and "s_per_token" in by[base]:
            r["decode_speedup"] = by[base]["s_per_token"] / r["s_per_token"]
            r["ttft_speedup"] = by[base]["ttft_s"] / r["ttft_s"]
    return {"row": "generation", "shape": f"SigLIP {args.vlm_preset} + Gemma3 {args.lm_preset}, batch 1, "
            f"{ids.shape[1]} prompt tokens (image included), {new_tokens} new tokens, "
            f"{str(dtype).replace('torch.', '')}", "results": results}
