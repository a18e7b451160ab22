"""fp32 master weights for whatever trains, whatever dtype the checkpoint is stored in.

The hub stores Gemma 3 and SigLIP in bf16 and transformers 5 loads them so. AdamW on bf16
weights rounds small updates away: a full Stage2 fine-tune at lr 2e-5 moved none of the LM's
weights of magnitude 2^-6 or more. Each test trains the same tiny model twice, stored in fp32
and stored in bf16, and asks the bf16-stored run to move its weights as the fp32-stored one does.
"""
import json

import pytest
import torch

from scripts.demo.make_tiny_models import _texts_from_files, build_tiny_gemma3, build_tiny_siglip
from training.precision import master_weights

BIG = 2.0 ** -6  # |w| from which a bf16 weight no longer moves under lr 2e-5 updates


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    pass


@pytest.fixture(scope="module")
def towers(tmp_path_factory, demo_dir):
    """The same tiny SigLIP and Gemma 3, saved once in fp32 and once in bf16 (as the hub ships them)."""
    root = tmp_path_factory.mktemp("dtypes")
    texts = _texts_from_files([demo_dir / "stage2_train.json", demo_dir / "stage0_train.json"])
    out = {}
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        siglip = build_tiny_siglip(root / name / "siglip", texts, image_size=32, patch_size=16, hidden_size=64,
                                   num_layers=2, num_heads=2, vocab_size=400)
        if dtype is not None:  # SigLIP stored in bf16 as the hub's checkpoints are
            from transformers import SiglipModel
            SiglipModel.from_pretrained(siglip, dtype=dtype).save_pretrained(siglip)
        gemma = build_tiny_gemma3(root / name / "gemma3", texts, hidden_size=64, num_layers=2, num_heads=2,
                                  vocab_size=400, dtype=dtype)
        out[name] = {"siglip": siglip, "gemma3": gemma}
    cfg = json.loads((out["bf16"]["gemma3"] / "config.json").read_text())
    assert cfg.get("dtype", cfg.get("torch_dtype")) == "bfloat16"
    return out


def _moved(before: dict, after: dict, keys) -> float:
    """The share of large weights (|w| >= 2^-6) that changed."""
    big = moved = 0
    for k in keys:
        a, b = before[k].float(), after[k].float()
        sel = a.abs() >= BIG
        big += int(sel.sum())
        moved += int((a[sel] != b[sel]).sum())
    return moved / max(big, 1)


def test_master_weights_casts_what_trains_and_keeps_frozen_storage():
    lin, frozen = torch.nn.Linear(4, 4).bfloat16(), torch.nn.Linear(4, 4).bfloat16()
    frozen.requires_grad_(False)
    bn = torch.nn.BatchNorm1d(4).bfloat16()
    model = torch.nn.ModuleDict({"lin": lin, "frozen": frozen, "bn": bn})
    changed = master_weights(model, "bf16")
    assert lin.weight.dtype == torch.float32 and bn.weight.dtype == torch.float32
    assert bn.running_mean.dtype == torch.float32  # a trained module's statistics follow it
    assert frozen.weight.dtype == torch.bfloat16  # bf16 autocast computes it as stored: half the memory
    assert changed["lin.weight"] == torch.bfloat16 and "frozen.weight" not in changed
    master_weights(model, "no")  # a GPU without bf16: nothing may stay in bf16
    assert all(t.dtype == torch.float32 for t in model.state_dict().values() if t.is_floating_point())


def _stage2_lm_after(towers, which, data, out, mixed="bf16"):
    from Stage2.train_vqa_stage2 import main
    from Stage2.trainer import part_of
    d = towers[which]
    trainer = main(["--image_root", str(data), "--train_json", str(data / "stage2_train.json"),
                    "--output_dir", str(out), "--vision_model_name", str(d["siglip"]), "--llm_name", str(d["gemma3"]),
                    "--batch_size", "8", "--learning_rate", "2e-5", "--lr_scheduler", "constant", "--max_steps", "12",
                    "--num_epochs", "1", "--num_workers", "0", "--report_to", "none", "--max_a_len", "16",
                    "--warmup_steps", "0", "--mixed_precision", mixed, "--no-save_every_epoch"])
    state = {k: v.detach().cpu() for k, v in trainer.vlm.state_dict().items() if part_of(k) == "llm"}
    trained = {str(p.dtype) for p in trainer.vlm.parameters() if p.requires_grad}
    return state, trained


def test_stage2_full_fine_tune_from_bf16_checkpoint_moves_the_lm(towers, demo_dir, tmp_path, fresh_accelerator_state):
    from safetensors.torch import load_file
    moved = {}
    for which in ("fp32", "bf16"):
        start = {"model.language_model." + k.removeprefix("model."): v
                 for k, v in load_file(towers[which]["gemma3"] / "model.safetensors").items()}
        after, trained = _stage2_lm_after(towers, which, demo_dir, tmp_path / "runs" / which)
        assert trained == {"torch.float32"}, trained
        keys = [k for k in start if k in after]
        assert len(keys) > 10
        moved[which] = _moved(start, after, keys)
    assert moved["fp32"] > 0.5, moved
    # Before master weights the bf16-stored run moved 0.0% of them: every Adam step rounded back.
    assert moved["bf16"] > 0.9 * moved["fp32"], moved
    # The export keeps the checkpoint's storage dtype, so it is as large as the base, not twice.
    cfg = json.loads((tmp_path / "runs" / "bf16" / "final_model" / "language_model" / "config.json").read_text())
    assert cfg.get("dtype", cfg.get("torch_dtype")) == "bfloat16"


def test_stage1_projector_trains_on_bf16_checkpoints_without_bf16_compute(towers, demo_dir, tmp_path,
                                                                         fresh_accelerator_state):
    """`--mixed_precision no` (a V100/T4) with a bf16-stored tower and LM: the frozen parts become
    fp32 (before, the fp32 projector met bf16 features and the step failed), the projector learns."""
    from Stage1.train_projection_stage1 import main
    d = towers["bf16"]
    trainer = main(["--image_root", str(demo_dir), "--train_json", str(demo_dir / "stage1_train.json"),
                    "--output_dir", str(tmp_path / "s1"), "--vision_model_name", str(d["siglip"]),
                    "--llm_name", str(d["gemma3"]), "--batch_size", "8", "--learning_rate", "1e-3", "--max_steps", "4",
                    "--num_epochs", "1", "--num_workers", "0", "--report_to", "none", "--max_caption_len", "32",
                    "--mixed_precision", "no", "--no-save_every_epoch", "--logging_steps", "1"])
    assert {p.dtype for p in trainer.model.parameters()} == {torch.float32}
    logged = [json.loads(line) for line in (tmp_path / "s1" / "metrics.jsonl").read_text().splitlines()]
    assert sum("train/loss" in m for m in logged) == 4
    from safetensors.torch import load_file
    exported = load_file(tmp_path / "s1" / "final_model" / "model.safetensors")
    assert {v.dtype for v in exported.values()} == {torch.bfloat16}  # the checkpoints' storage, not 2x
    assert {p.dtype for p in trainer.model.parameters()} == {torch.float32}  # and training goes on in fp32


def test_stage0_image_tower_from_bf16_checkpoint_trains_in_fp32(towers, demo_dir, tmp_path, fresh_accelerator_state):
    """A tower loaded by --image_model_name keeps the checkpoint's dtype (load_vision_tower);
    the trainer makes it fp32 before the optimizer sees it, while the frozen text tower stays bf16."""
    from Stage0.train_vision_encoder_stage0 import main
    moved = {}
    for which in ("fp32", "bf16"):
        d = towers[which]
        trainer = main(["--image_model_name", str(d["siglip"]), "--text_model_name", str(d["siglip"]),
                        "--train_json", str(demo_dir / "stage0_train.json"), "--image_root", str(demo_dir),
                        "--output_dir", str(tmp_path / which), "--batch_size", "16", "--learning_rate", "2e-5",
                        "--lr_scheduler", "constant", "--warmup_steps", "0", "--max_steps", "6", "--num_epochs", "1",
                        "--num_workers", "0", "--report_to", "none", "--mixed_precision", "bf16",
                        "--no-save_epoch_models"])
        model = trainer.encoder.model
        assert {p.dtype for p in model.image.parameters() if p.requires_grad} == {torch.float32}
        if which == "bf16":
            assert model.text.backbone.embeddings.token_embedding.weight.dtype == torch.bfloat16
        from transformers import SiglipVisionModel
        start = SiglipVisionModel.from_pretrained(d["siglip"]).state_dict()
        after = {k: v.detach().cpu() for k, v in model.image.backbone.state_dict().items()}
        moved[which] = _moved(start, after, [k for k in start if k in after and start[k].ndim >= 2])
    assert moved["fp32"] > 0.5 and moved["bf16"] > 0.9 * moved["fp32"], moved
