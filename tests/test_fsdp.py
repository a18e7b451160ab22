"""FSDP2 on 2 CPU processes (gloo), through accelerate's own FSDP2 `prepare` (fully_shard per
block, the root unit holding the tied embedding and LM head) and the project's sharded resume
checkpoints and gathered exports. accelerate serves FSDP on accelerators only; the
sitecustomize in tests/engines/fsdp_on_cpu sets its state to what scripts/accelerate/fsdp.yaml
builds on GPUs (see there). Each run is checked against the same run under DDP."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import ROOT, accelerate_two_processes, assert_same_training
from safetensors.torch import load_file
from test_reliability_loop import _same_safetensors, tiny_vlm_parts

pytestmark = pytest.mark.slow

FSDP_ON_CPU = ROOT / "tests" / "engines" / "fsdp_on_cpu"
STAGE0, STAGE1, STAGE2 = ("Stage0/train_vision_encoder_stage0.py", "Stage1/train_projection_stage1.py",
                          "Stage2/train_vqa_stage2.py")


@pytest.fixture(scope="module")
def vlm(tmp_path_factory, demo_dir):
    return tiny_vlm_parts(tmp_path_factory.mktemp("fsdp_vlm"), demo_dir, 16)


def _run(script, argv, engine):
    if engine == "fsdp":
        proc = accelerate_two_processes(script, argv, site=FSDP_ON_CPU, config="scripts/accelerate/fsdp.yaml")
    else:
        proc = accelerate_two_processes(script, argv)
    assert proc.returncode == 0, proc.stdout[-4000:]
    return proc


def _stage2_argv(vlm, demo_dir, out, *extra):
    # A clip norm small enough to clip every step: the clip must see the sharded gradients.
    return ["--image_root", demo_dir, "--train_json", vlm["root"] / "train.json", "--output_dir", out,
            "--vision_model_name", vlm["siglip"], "--llm_name", vlm["gemma3"], "--batch_size", "2",
            "--learning_rate", "2e-3", "--max_steps", "4", "--report_to", "none", "--max_a_len", "12",
            "--warmup_steps", "1", "--logging_steps", "1", "--no-save_every_epoch", "--max_grad_norm", "0.05",
            "--seed", "3", *extra]


def _close_safetensors(a, b, atol=1e-6):
    """Equal within float32 rounding; a bf16-stored tensor (the checkpoint's dtype, which an export
    casts trained weights back to) may round the other way: one bf16 step, 2^-7 of the value."""
    x, y = load_file(str(a)), load_file(str(b))
    assert x.keys() == y.keys()
    far = [k for k in x if not torch.allclose(x[k].float(), y[k].float(), atol=atol,
                                              rtol=2 ** -7 if x[k].dtype == torch.bfloat16 else 0)]
    assert not far, f"{len(far)} tensors differ beyond rounding, e.g. {far[:3]}"


@pytest.mark.parametrize("what", ["full", "lora"])
def test_stage2_under_fsdp_exports_what_ddp_exports(vlm, demo_dir, tmp_path, what):
    """A full fine-tune (the LM's tied embedding and head train) and LoRA with the projector in
    modules_to_save: the gathered export equals DDP's within float32 rounding, the exported LM
    head is still the embedding, and the adapter folder holds the same adapter. With LoRA, a
    validation set of 3 batches over 2 processes: under FSDP the process with one batch runs a
    blank second one (every forward gathers shards on every process), and the loss is DDP's."""
    extra = ["--mixed_precision", "no"]
    if what == "lora":
        val = tmp_path / "val.json"
        val.write_text(json.dumps(json.loads((demo_dir / "stage2_val.json").read_text())[:5]))
        extra += ["--lora_r", "4", "--unfreeze_projection_layer", "--val_json", val]
    runs = {}
    for engine in ("ddp", "fsdp"):
        runs[engine] = tmp_path / engine
        _run(STAGE2, _stage2_argv(vlm, demo_dir, runs[engine], *extra), engine)
    _close_safetensors(runs["ddp"] / "final_model" / "model.safetensors", runs["fsdp"] / "final_model" / "model.safetensors")
    if what == "lora":
        _close_safetensors(runs["ddp"] / "final_model/lora_adapter/adapter_model.safetensors",
                           runs["fsdp"] / "final_model/lora_adapter/adapter_model.safetensors")
        losses = {e: [m["val/loss"] for m in map(json.loads, (runs[e] / "metrics.jsonl").read_text().splitlines())
                      if "val/loss" in m] for e in runs}
        assert len(losses["fsdp"]) >= 2 and losses["fsdp"] == pytest.approx(losses["ddp"], abs=1e-5), losses
    from transformers import AutoModelForImageTextToText
    model = AutoModelForImageTextToText.from_pretrained(runs["fsdp"] / "final_model")
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight
    base = load_file(str(Path(vlm["gemma3"]) / "model.safetensors"))
    q = "layers.0.self_attn.q_proj.weight"
    trained = model.model.language_model.get_parameter(q).detach()
    assert not torch.allclose(trained, base[f"model.{q}"].to(trained.dtype)), "the run did not train"


def test_stage2_under_fsdp_resumes_exactly(vlm, demo_dir, tmp_path):
    """A sharded checkpoint at step 2 (each process writes its shards of the trained tensors and
    of AdamW's state), resumed, ends where the uninterrupted run ends, bit for bit; the
    checkpoint holds no frozen weight."""
    run = tmp_path / "run"
    argv = _stage2_argv(vlm, demo_dir, run, "--mixed_precision", "no", "--checkpointing_steps", "2")
    _run(STAGE2, argv, "fsdp")
    step2 = run / "checkpoints" / "step_2"
    assert (step2 / "sharded" / ".metadata").is_file()
    assert not list(step2.glob("*.safetensors")), "the sharded checkpoint replaces the trained-tensor file"
    import torch.distributed.checkpoint as dcp
    meta = dcp.FileSystemReader(str(step2 / "sharded")).read_metadata()
    saved = {k.removeprefix("model.") for k in meta.state_dict_metadata if k.startswith("model.")}
    assert saved and all(k.startswith("vlm.model.language_model.") or k == "vlm.lm_head.weight" for k in saved), saved
    assert not any("vision_tower" in k for k in saved)
    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_4")
    shutil.rmtree(resumed / "final_model")
    args = _stage2_argv(vlm, demo_dir, resumed, "--mixed_precision", "no", "--checkpointing_steps", "2",
                        "--resume_from_checkpoint", "latest")
    proc = _run(STAGE2, args, "fsdp")
    assert "resumed from" in proc.stdout and "step_2" in proc.stdout
    _same_safetensors(run / "final_model" / "model.safetensors", resumed / "final_model" / "model.safetensors")


def test_stage2_under_fsdp_keeps_frozen_parts_in_bf16_beside_fp32_trained_ones(vlm, demo_dir, tmp_path):
    """bf16: the frozen vision tower and projector stay in their stored bf16 inside shard units
    whose trained parameters are fp32 (torch asks one dtype of the trained ones only). The run
    trains, the export keeps the frozen tower byte for byte, and it is close to DDP's."""
    runs = {}
    for engine in ("ddp", "fsdp"):
        runs[engine] = tmp_path / engine
        _run(STAGE2, _stage2_argv(vlm, demo_dir, runs[engine], "--mixed_precision", "bf16"), engine)
    ddp = load_file(str(runs["ddp"] / "final_model" / "model.safetensors"))
    fsdp = load_file(str(runs["fsdp"] / "final_model" / "model.safetensors"))
    tower = [k for k in fsdp if "vision_tower" in k]
    assert tower and all(torch.equal(ddp[k], fsdp[k]) for k in tower)
    lm = [k for k in fsdp if "language_model" in k]
    worst = max((ddp[k].float() - fsdp[k].float()).abs().max().item() for k in lm)
    assert worst < 5e-3, worst  # bf16 compute, cast at the gather (FSDP) or per op (autocast)


def test_stage1_under_fsdp_exports_what_ddp_exports(vlm, demo_dir, tmp_path):
    """Stage 1 trains the projector alone: sharded, it is gathered for the export."""
    captions = tmp_path / "captions.json"
    captions.write_text(json.dumps(json.loads((demo_dir / "stage1_train.json").read_text())[:16]))
    runs = {}
    for engine in ("ddp", "fsdp"):
        runs[engine] = tmp_path / engine
        argv = ["--image_root", demo_dir, "--train_json", captions, "--output_dir", runs[engine],
                "--vision_model_name", vlm["siglip"], "--llm_name", vlm["gemma3"], "--batch_size", "2",
                "--learning_rate", "2e-3", "--max_steps", "4", "--report_to", "none", "--warmup_steps", "1",
                "--no-save_every_epoch", "--max_grad_norm", "0.05", "--seed", "3", "--mixed_precision", "no"]
        _run(STAGE1, argv, engine)
    from projectors import PROJECTOR_DIR, PROJECTOR_WEIGHTS
    for f in ("model.safetensors", f"{PROJECTOR_DIR}/{PROJECTOR_WEIGHTS}"):
        _close_safetensors(runs["ddp"] / "final_model" / f, runs["fsdp"] / "final_model" / f)


def test_every_stage_runs_under_fsdp_and_train_ve_first_epoch_is_refused():
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from accelerator_setup import check_engine
    fsdp = SimpleNamespace(distributed_type=DistributedType.FSDP)
    for stage in ("Stage0", "Stage1", "Stage2"):
        check_engine(fsdp, stage, SimpleNamespace())
    with pytest.raises(SystemExit, match="--train_ve_first_epoch"):
        check_engine(fsdp, "Stage2", SimpleNamespace(train_ve_first_epoch=True))


def test_stage2_base_vlm_under_fsdp_exports_what_ddp_exports(vlm, demo_dir, tmp_path):
    """--base_vlm (a MedGemma-shaped Gemma3ForConditionalGeneration, its 262k-row table tied to the
    LM head) fully fine-tuned: the gathered export in the checkpoint's own class equals DDP's, and
    the head is still the table."""
    from scripts.demo.make_tiny_models import build_tiny_medgemma
    base = build_tiny_medgemma(tmp_path / "medgemma-4b-it")
    runs = {}
    for engine in ("ddp", "fsdp"):
        runs[engine] = tmp_path / engine
        argv = ["--image_root", demo_dir, "--train_json", vlm["root"] / "train.json", "--output_dir", runs[engine],
                "--base_vlm", base, "--batch_size", "2", "--learning_rate", "2e-3", "--max_steps", "3",
                "--report_to", "none", "--max_a_len", "12", "--warmup_steps", "1", "--no-save_every_epoch",
                "--max_grad_norm", "0.05", "--seed", "3", "--mixed_precision", "no"]
        _run(STAGE2, argv, engine)
    _close_safetensors(runs["ddp"] / "final_model" / "model.safetensors", runs["fsdp"] / "final_model" / "model.safetensors")
    from transformers import AutoModelForImageTextToText
    model = AutoModelForImageTextToText.from_pretrained(runs["fsdp"] / "final_model")
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight


# ---------------------------------------------------------------- Stage0 and its recipes

@pytest.fixture(scope="module")
def stage0_towers(tmp_path_factory, demo_dir, tiny_siglip, hub_merlin_ckpt):
    """Each kind of Stage0 run a recipe makes, at tiny sizes: the default SigLIP pair, the derm
    recipe (bf16-stored SigLIP, LoRA, the label-aware losses), a DINOv2 image tower with an
    LLM2Vec-style decoder text tower trained through LoRA (the knee and CT towers' kinds), and
    the CT recipe's Merlin 3D tower with a BERT text tower."""
    import csv

    from scripts.demo.make_demo_data import main as make_demo
    from scripts.demo.make_tiny_models import (
        _texts_from_files,
        build_tiny_bert,
        build_tiny_dinov2,
        build_tiny_llama,
        build_tiny_siglip,
    )
    from Stage0.labels import class_text, read_classes
    root = tmp_path_factory.mktemp("stage0_fsdp")
    train = json.loads((demo_dir / "stage0_train.json").read_text())[:48]  # 4 steps an epoch on 2 x 6
    (root / "train.json").write_text(json.dumps(train))
    derm = make_demo(["--recipe", "derm", "--out_dir", str(root / "derm"), "--num_images", "120",
                      "--image_size", "64", "--seed", "0"])
    classes = read_classes(derm.parent / "classes.csv")
    ct = make_demo(["--recipe", "ct", "--out_dir", str(root / "ct"), "--num_images", "60", "--image_size", "32",
                    "--seed", "1"])
    captions = ["--train_json", root / "train.json", "--val_json", demo_dir / "stage0_val.json",
                "--image_root", demo_dir, "--batch_size", "6", "--max_steps", "4"]
    return {
        # val: 30 rows in batches of 12, 3 batches over 2 processes (one runs a blank forward)
        "siglip": ["--model_name", tiny_siglip, *captions],
        "derm": ["--model_name", build_tiny_siglip(root / "derm_siglip", [class_text(c, classes) for c in classes] * 5,
                                                   image_size=64, hidden_size=64, num_layers=2, num_heads=2,
                                                   dtype=torch.bfloat16),
                 "--csv_file", derm, "--label_column", "labels", "--classes_file", derm.parent / "classes.csv",
                 "--loss", "multi_positive,weighted,icd,wasserstein,hard_negative", "--lora_r", "4",
                 "--lora_alpha", "8", "--no_freeze_logit_scale", "--oversample_min", "0", "--batch_size", "8",
                 "--max_steps", "3"],
        "towers": ["--image_model_name", build_tiny_dinov2(root / "dinov2"), "--text_model_name",
                   build_tiny_llama(root / "llama", _texts_from_files([demo_dir / "stage0_train.json"])),
                   "--text_lora_r", "4", "--no_freeze_text_encoder", "--projection_dim", "32", *captions],
        "ct": ["--image_model_name", "merlin", "--image_model_path", hub_merlin_ckpt, "--merlin_layers", "1", "1", "1",
               "1", "--merlin_width", "8", "--volume_size", "16", "32", "32", "--csv_file", ct, "--text_model_name",
               build_tiny_bert(root / "bert", [r["findings"] for r in csv.DictReader(open(ct))]),
               "--no_freeze_text_encoder", "--batch_size", "4", "--max_steps", "3"],
    }


def _stage0_argv(towers, out, *extra):
    # A clip norm small enough to clip every step: the clip must see the sharded gradients.
    return [*towers, "--output_dir", out, "--learning_rate", "2e-3", "--report_to", "none", "--seed", "3",
            "--warmup_steps", "1", "--logging_steps", "1", "--no-save_epoch_models", "--max_grad_norm", "0.05",
            "--num_workers", "0", "--mixed_precision", "no", *extra]


# Float32 rounding apart (a reduce-scatter sums in another order than DDP's all-reduce), except
# Merlin's convolutions: AdamW's first steps divide tiny gradients by their own size, which
# carries the rounding into 1e-5 of a weight.
@pytest.mark.parametrize("kind,atol", [("siglip", 1e-6), ("derm", 1e-6), ("towers", 1e-6), ("ct", 1e-4)])
def test_stage0_under_fsdp_exports_what_ddp_exports(stage0_towers, tmp_path, kind, atol):
    """Every kind of Stage0 run: the gathered export (the SiglipModel, the merged LoRA and its
    adapter, a towers folder with its heads) equals DDP's; the validation loss, where the run has
    a validation set of uneven shards, is DDP's."""
    runs = {}
    for engine in ("ddp", "fsdp"):
        runs[engine] = tmp_path / engine
        _run(STAGE0, _stage0_argv(stage0_towers[kind], runs[engine]), engine)
    files = sorted(p.relative_to(runs["ddp"] / "final_model") for p in (runs["ddp"] / "final_model").rglob("*.safetensors"))
    assert files == sorted(p.relative_to(runs["fsdp"] / "final_model")
                           for p in (runs["fsdp"] / "final_model").rglob("*.safetensors"))
    for f in files:
        _close_safetensors(runs["ddp"] / "final_model" / f, runs["fsdp"] / "final_model" / f, atol=atol)
    a, b = (torch.load(runs[e] / "final_model" / "vision_encoder.bin", weights_only=True) for e in runs)
    assert a.keys() == b.keys() and all(torch.allclose(a[k].float(), b[k].float(), atol=atol) for k in a)
    # the same steps: losses, and gradient norms above the clip (each clipped, so the run moved)
    steps = 3 if kind in ("derm", "ct") else 4
    val = assert_same_training(runs["ddp"], runs["fsdp"], steps)
    norms = [m["train/grad_norm"] for m in map(json.loads, (runs["fsdp"] / "metrics.jsonl").read_text().splitlines())
             if "train/grad_norm" in m]
    assert len(norms) == steps and min(norms) > 0.05, norms
    if kind in ("siglip", "towers"):  # before and after, on uneven shards
        assert len(val[1]) == 2 and val[1] == pytest.approx(val[0], abs=1e-5) and val[1][0] != val[1][1]


def test_stage0_under_fsdp_resumes_exactly(stage0_towers, tmp_path):
    """A sharded checkpoint at step 2 holds the trained image tower and no frozen text tensor;
    resumed, the run ends where the uninterrupted one ends, bit for bit."""
    run = tmp_path / "run"
    _run(STAGE0, _stage0_argv(stage0_towers["siglip"], run, "--checkpointing_steps", "2"), "fsdp")
    step2 = run / "checkpoints" / "step_2"
    import torch.distributed.checkpoint as dcp
    meta = dcp.FileSystemReader(str(step2 / "sharded")).read_metadata()
    saved = {k.removeprefix("model.") for k in meta.state_dict_metadata if k.startswith("model.")}
    assert saved and all(k.startswith("model.image.") for k in saved), saved
    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_4")
    shutil.rmtree(resumed / "final_model")
    proc = _run(STAGE0, _stage0_argv(stage0_towers["siglip"], resumed, "--checkpointing_steps", "2",
                                     "--resume_from_checkpoint", "latest"), "fsdp")
    assert "resumed from" in proc.stdout and "step_2" in proc.stdout
    _same_safetensors(run / "final_model" / "model.safetensors", resumed / "final_model" / "model.safetensors")
