"""A frozen tower is written once per run: resume checkpoints hold the trained tensors and a
fingerprint of the frozen ones (a resume onto other frozen weights is refused), exports link
an unchanged tower to its first copy, a frozen text backbone leaves the accelerator once its
captions are cached, and the CT recipe's phase 2 trains its decoder text tower through LoRA."""
import csv
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from scripts.demo.make_demo_data import main as make_demo
from scripts.demo.make_tiny_models import build_tiny_dinov2, build_tiny_gemma3
from Stage0.merlin import MerlinBackbone
from Stage0.towers import load_model
from Stage0.train_vision_encoder_stage0 import main

TINY_MERLIN = ["--merlin_layers", "1", "1", "1", "1", "--merlin_width", "8", "--volume_size", "16", "32", "32"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    pass


@pytest.fixture(scope="module")
def towers(tmp_path_factory, demo_dir):
    """A small image tower and a decoder text tower that outweighs it (a 40k-row embedding
    table: 10 MB), as an 8B LLM2Vec tower outweighs Merlin."""
    root = tmp_path_factory.mktemp("towers")
    texts = [r["caption"] for r in json.loads((demo_dir / "stage0_train.json").read_text())]
    return {"dino": build_tiny_dinov2(root / "dino", image_size=32, patch_size=8, hidden_size=32, num_layers=1),
            "gemma": build_tiny_gemma3(root / "gemma", texts, hidden_size=64, num_layers=2, num_heads=2,
                                       vocab_size=400, model_vocab_size=40000)}


def _argv(towers, demo_dir, out, *extra):
    return ["--image_model_name", str(towers["dino"]), "--text_model_path", str(towers["gemma"]),
            "--train_json", str(demo_dir / "stage0_train.json"), "--val_json", str(demo_dir / "stage0_val.json"),
            "--image_root", str(demo_dir), "--output_dir", str(out), "--batch_size", "16", "--num_workers", "0",
            "--report_to", "none", "--learning_rate", "1e-3", "--warmup_steps", "2", "--logging_steps", "1",
            "--max_text_length", "32", "--seed", "3", *extra]


def disk_usage(folder) -> int:
    """Bytes on disk, each hard-linked file counted once."""
    seen = {}
    for root, _, files in os.walk(folder):
        for f in files:
            st = os.stat(Path(root) / f)
            seen[(st.st_dev, st.st_ino)] = st.st_size
    return sum(seen.values())


def _checkpoints(out):
    return sorted((Path(out) / "checkpoints").glob("step_*"), key=lambda p: int(p.name[5:]))


def test_a_frozen_text_tower_is_on_disk_once(towers, demo_dir, tmp_path, monkeypatch):
    """3 epochs, each exported (epoch_N/, best_model/, final_model/), and a resume checkpoint
    every 4 steps (the newest 3 kept): the run's folder weighs about one copy of the frozen
    text tower (before: one per export and per checkpoint, 9x). Each export still loads on its
    own, the checkpoints hold no frozen tensor, and the frozen backbone, moved off the device
    once its captions were cached, never runs again (validation uses cached features too)."""
    import Stage0.trainer as stage0_trainer
    calls = []
    offload = stage0_trainer.VisionEncoderTrainerStage0._offload_text_backbone

    def counting(self):
        offload(self)
        self.encoder.model.text.backbone.register_forward_pre_hook(lambda *a: calls.append(1))
    monkeypatch.setattr(stage0_trainer.VisionEncoderTrainerStage0, "_offload_text_backbone", counting)
    out = tmp_path / "run"
    trainer = main(_argv(towers, demo_dir, out, "--num_epochs", "3", "--checkpointing_steps", "4",
                         "--checkpoints_total_limit", "3"))
    runs_after_caching = len(calls)
    tower = (out / "final_model" / "text_tower" / "model.safetensors").stat().st_size
    assert tower > 9_000_000
    exports = ["epoch_1", "epoch_2", "epoch_3", "best_model", "final_model"]
    assert all((out / e / "towers.json").is_file() for e in exports) and len(_checkpoints(out)) == 3
    used = disk_usage(out)
    assert used < 1.3 * tower, f"{used / 1e6:.1f} MB on disk for a {tower / 1e6:.1f} MB frozen text tower"
    first = out / "epoch_1" / "text_tower" / "model.safetensors"
    for e in exports:
        assert os.path.samefile(first, out / e / "text_tower" / "model.safetensors"), e
    # The trained image tower differs between epochs: written, not linked.
    assert not os.path.samefile(out / "epoch_1" / "vision_encoder.bin", out / "epoch_3" / "vision_encoder.bin")
    # A folder is whole: it loads on its own with the others gone.
    shutil.rmtree(out / "epoch_1")
    shutil.rmtree(out / "best_model")
    model = load_model(out / "final_model")[0].eval()
    live = trainer.encoder.model.eval()
    ds = trainer.val_dataset
    with torch.no_grad():
        torch.testing.assert_close(model.text(ds.input_ids[:4], ds.attention_mask[:4]),
                                   live.text(ds.input_ids[:4], ds.attention_mask[:4]), rtol=0, atol=0)
    # Resume checkpoints: the trained tensors only.
    trained = {f"model.{n}" for n, p in live.named_parameters() if p.requires_grad}
    for ckpt in _checkpoints(out):
        held = set(load_file(ckpt / "model.safetensors"))
        assert held == trained, sorted(held ^ trained)[:5]
        assert json.loads((ckpt / "frozen_weights.json").read_text())["bytes"] > 0.99 * tower
    # The frozen text backbone: off the device after caching, and never run again.
    assert trainer.text_backbone_offloaded
    assert {p.device.type for p in live.text.backbone.parameters()} == {"cpu"}
    assert runs_after_caching == 0
    # The val metrics from cached features are those of embedding the captions through the backbone.
    from Stage0.trainer import evaluate_contrastive
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "val/loss" in line]
    again = evaluate_contrastive(trainer.encoder, ds, 16, "cpu")
    assert logged[-1]["val/loss"] == again["loss"] and logged[-1]["val/acc_i2t"] == again["acc_i2t"]


def test_resume_with_a_frozen_text_tower_is_exact_and_refuses_other_frozen_weights(towers, demo_dir, tmp_path):
    """Cut at step 4 (epoch 1) and resumed from that trained-only checkpoint: every weight and
    buffer of the uninterrupted run. Resumed onto a text tower whose weights changed on disk,
    it stops in one line naming the checkpoint."""
    flags = ("--max_steps", "8", "--checkpointing_steps", "4", "--checkpoints_total_limit", "5", "--no-save_epoch_models")
    gemma = shutil.copytree(towers["gemma"], tmp_path / "gemma")
    argv = _argv(towers, demo_dir, tmp_path / "full", *flags)
    argv[argv.index("--text_model_path") + 1] = str(gemma)
    full = main(argv)
    cut = tmp_path / "cut"
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step_4", cut / "checkpoints" / "step_4")
    resume = [a if a != str(tmp_path / "full") else str(cut) for a in argv] + ["--resume_from_checkpoint", "latest"]
    resumed = main(resume)
    a, b = full.encoder.model.state_dict(), resumed.encoder.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)

    # The frozen tower's weights change at the same path: its trained head no longer belongs to it.
    from safetensors.torch import save_file
    weights = load_file(gemma / "model.safetensors")
    name = next(k for k in weights if "embed_tokens" in k)
    weights[name] = weights[name] * 1.01
    save_file(weights, str(gemma / "model.safetensors"), metadata={"format": "pt"})
    shutil.rmtree(cut / "checkpoints" / "step_8")
    shutil.rmtree(cut / "final_model")
    with pytest.raises(SystemExit) as stop:
        main(resume)
    message = stop.value.code
    assert isinstance(message, str) and "\n" not in message
    assert message.startswith(f"error: checkpoint {cut / 'checkpoints' / 'step_4'} was trained on other frozen weights")


def test_text_lora_trains_adapters_only_and_exports_a_merged_text_tower(towers, demo_dir, tmp_path):
    """--text_lora_r on a decoder text tower: in the text backbone only the adapters train (its
    weights stay the checkpoint's); the export merges them (fp32) into a plain towers folder that
    load_model reads and that embeds texts as the live model with adapters does, and keeps the
    adapter in text_tower/lora_adapter/."""
    from transformers import AutoModel
    trainer = main(_argv(towers, demo_dir, tmp_path / "run", "--max_steps", "4", "--text_lora_r", "4",
                         "--no-save_epoch_models", "--learning_rate", "1e-2", "--projection_dim", "32",
                         "--checkpointing_steps", "2"))
    live = trainer.encoder.model.eval()
    trained = [n for n, p in live.text.backbone.named_parameters() if p.requires_grad]
    assert trained and all("lora_" in n for n in trained)
    assert {n.split(".")[-4] for n in trained if "lora_A" in n} == {"q_proj", "k_proj", "v_proj", "o_proj",
                                                                     "gate_proj", "up_proj", "down_proj"}
    assert live.text.head.weight.requires_grad and any(p.requires_grad for p in live.image.parameters())
    base = AutoModel.from_pretrained(towers["gemma"]).state_dict()
    for n, p in live.text.backbone.named_parameters():
        if "lora_" not in n:
            assert torch.equal(p, base[n.replace(".base_layer", "")]), n
    assert any(p.abs().sum() > 0 for n, p in live.text.backbone.named_parameters() if "lora_B" in n)
    final = tmp_path / "run" / "final_model"
    assert (final / "text_tower" / "lora_adapter" / "adapter_model.safetensors").is_file()
    cfg = json.loads((final / "text_tower" / "lora_adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8 and cfg["base_model_name_or_path"] == str(towers["gemma"])
    assert not any("lora_" in k or "base_layer" in k for k in load_file(final / "text_tower" / "model.safetensors"))
    merged = load_model(final)[0].eval()
    ds = trainer.val_dataset
    with torch.no_grad():
        torch.testing.assert_close(merged.text(ds.input_ids[:8], ds.attention_mask[:8]),
                                   live.text(ds.input_ids[:8], ds.attention_mask[:8]), rtol=1e-5, atol=1e-5)
    held = set(load_file(_checkpoints(tmp_path / "run")[-1] / "model.safetensors"))
    assert not any(k.startswith("model.text.backbone.") and "lora_" not in k for k in held)


@pytest.fixture(scope="module")
def ct(tmp_path_factory):
    root = tmp_path_factory.mktemp("ct")
    csv_path = make_demo(["--recipe", "ct", "--out_dir", str(root / "data"), "--num_images", "80",
                          "--image_size", "32", "--seed", "1"])
    texts = [r["findings"] for r in csv.DictReader(open(csv_path))]
    torch.manual_seed(0)
    merlin = root / "merlin_tiny.pt"
    torch.save(MerlinBackbone(layers=(1, 1, 1, 1), width=8).state_dict(), merlin)
    return {"csv": csv_path, "merlin": merlin,
            "gemma": build_tiny_gemma3(root / "gemma", texts, hidden_size=64, num_layers=2, num_heads=2,
                                       vocab_size=400)}


@pytest.mark.parametrize("backbone", ["frozen", "trained"])
def test_ct_recipe_with_text_lora_resumes_exactly(backbone, ct, tmp_path):
    """The CT recipe with LoRA (dropout on) on the decoder text tower, the Merlin backbone frozen
    (phase 1's BatchNorm statistics are frozen state: fingerprinted, not in the checkpoint) or
    trained (its statistics are trained state: in the checkpoint). Cut after step 3 of 6 and
    resumed: every weight and buffer of the uninterrupted run."""
    flags = ["--image_model_name", "merlin", "--image_model_path", str(ct["merlin"]), *TINY_MERLIN,
             "--text_model_path", str(ct["gemma"]), "--text_lora_r", "4", "--text_lora_dropout", "0.1",
             "--csv_file", str(ct["csv"]), "--batch_size", "8", "--learning_rate", "2e-3", "--report_to", "none",
             "--num_workers", "0", "--no-save_epoch_models", "--max_steps", "6", "--checkpointing_steps", "3",
             "--checkpoints_total_limit", "5", "--max_text_length", "32"]
    if backbone == "frozen":
        flags.append("--freeze_image_backbone")
    full = main([*flags, "--output_dir", str(tmp_path / "full")])
    ckpt = tmp_path / "full" / "checkpoints" / "step_3"
    held = set(load_file(ckpt / "model.safetensors"))
    bn = "model.image.backbone.bn1.running_mean"
    assert (bn in held) == (backbone == "trained")
    assert not any(k.startswith("model.text.backbone.") and "lora_" not in k for k in held)
    shutil.copytree(ckpt, tmp_path / "cut" / "checkpoints" / "step_3")
    resumed = main([*flags, "--output_dir", str(tmp_path / "cut"), "--resume_from_checkpoint", "latest"])
    a, b = full.encoder.model.state_dict(), resumed.encoder.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("lora", ["", "0"])
def test_ct_launcher_phase2_trains_the_text_tower_through_lora_by_default(lora, tmp_path):
    from conftest import launch_argv

    from Stage0.train_vision_encoder_stage0 import parse_args
    env = {"PHASE": "2", **({"TEXT_LORA_R": lora} if lora else {})}
    argv = launch_argv("scripts/run_ct_clip.sh", tmp_path, **env)
    args = parse_args(argv)
    assert "--num_epochs" not in argv and "--epochs" not in argv
    assert args.max_steps == 50000 and args.checkpointing_steps == 5000 and not args.freeze_text_encoder
    assert (args.text_lora_r, args.text_lora_alpha) == ((16, 32.0) if not lora else (0, 0.0))


def test_export_copies_link_what_is_unchanged_and_never_write_through_a_link(tmp_path, monkeypatch):
    """The helper every stage's exports use: identical files become links to the first copy
    (also one written before a resume), a folder written again first drops its links (the new
    content must not reach the other folders), parts known unchanged are linked without being
    written, and where links fail (another file system) a copy keeps each folder whole."""
    from training.exports import ExportCopies
    run = tmp_path / "run"

    def export(name, **files):
        for rel, text in files.items():
            (run / name / rel).parent.mkdir(parents=True, exist_ok=True)
            (run / name / rel).write_text(text)
        return run / name
    export("epoch_1", **{"tower/w.bin": "frozen", "heads.bin": "h1"})  # written before a resume
    copies = ExportCopies(run)
    e2 = export("epoch_2", **{"tower/w.bin": "frozen", "heads.bin": "h2"})
    copies.after_write(e2, parts=["tower"])
    assert os.path.samefile(e2 / "tower" / "w.bin", run / "epoch_1" / "tower" / "w.bin")
    assert not os.path.samefile(e2 / "heads.bin", run / "epoch_1" / "heads.bin")
    best = run / "best_model"
    copies.before_write(best)
    assert copies.link_parts(best, ["tower"]) == {"tower"}  # not written at all
    export("best_model", **{"heads.bin": "h2"})
    copies.after_write(best, parts=["tower"])
    assert os.path.samefile(best / "tower" / "w.bin", e2 / "tower" / "w.bin")
    assert os.path.samefile(best / "heads.bin", e2 / "heads.bin")
    copies.before_write(best)  # written again with new heads: epoch_2's stay as they were
    export("best_model", **{"heads.bin": "h3"})
    copies.after_write(best)
    assert (e2 / "heads.bin").read_text() == "h2" and (best / "heads.bin").read_text() == "h3"

    def no_links(*a):
        raise OSError(18, "Invalid cross-device link")
    monkeypatch.setattr(os, "link", no_links)
    final = run / "final_model"
    assert copies.link_parts(final, ["tower"]) == {"tower"}
    assert (final / "tower" / "w.bin").read_text() == "frozen"
    assert not os.path.samefile(final / "tower" / "w.bin", e2 / "tower" / "w.bin")


def test_a_saved_tensor_of_another_shape_is_refused_not_broadcast():
    """A 0-d tensor saved for a shape-[1] one (the towers' logit heads before FSDP) is read in
    the new shape; any other difference names the tensor, where copy_ would broadcast [1] over
    [64] without a word."""
    from training.checkpoints import _legacy_shape
    assert _legacy_shape(torch.tensor(2.5), torch.zeros(1), "x").tolist() == [2.5]
    with pytest.raises(ValueError, match=r"ckpt: head.bias has shape \(1,\) in the checkpoint, \(64,\) in this run"):
        _legacy_shape(torch.zeros(1), torch.zeros(64), "ckpt: head.bias")
