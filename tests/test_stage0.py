"""Stage0 end to end on the demo data with a tiny SigLIP saved as the hub ships SigLIP (bf16
weights, sentencepiece tokenizer, 64-token text)."""
import json
import shutil

import pytest
import torch
from transformers import SiglipModel

from Stage0.train_vision_encoder_stage0 import main, parse_args
from Stage0.trainer import DualEncoder, evaluate_contrastive


def _args(model, out, train, val=None, **kw):
    argv = ["--model_name", str(model), "--train_json", str(train), "--image_root", str(train.parent),
            "--output_dir", str(out), "--batch_size", "16", "--num_workers", "0", "--report_to", "none",
            "--learning_rate", "1e-3", "--warmup_steps", "2", "--logging_steps", "1",
            "--no-save_epoch_models"]
    if val:
        argv += ["--val_json", str(val)]
    for k, v in kw.items():
        argv += [f"--{k}"] + ([] if v is True else [str(v)])
    return argv


def test_help_and_defaults():
    a = parse_args(["--train_json", "x.json", "--output_dir", "o"])
    # the logit scale: frozen for a pretrained SigLIP pair, learnt for new heads (resolved in main)
    assert a.freeze_text_encoder and a.freeze_logit_scale is None and a.model_name.startswith("StanfordAIMI/")
    with pytest.raises(SystemExit) as e:
        parse_args(["--help"])
    assert e.value.code == 0


def test_frozen_parts_stay_bit_identical(hub_siglip, demo_dir, tmp_path):
    before = SiglipModel.from_pretrained(hub_siglip)
    trainer = main(_args(hub_siglip, tmp_path, demo_dir / "stage0_train.json", max_steps=3))
    after = trainer.encoder.model
    for (n, p0), p1 in zip(before.text_model.named_parameters(), after.text_model.parameters()):
        assert torch.equal(p0, p1), f"text tower changed: {n}"
    assert torch.equal(before.logit_scale, after.logit_scale)
    assert torch.equal(before.logit_bias, after.logit_bias)
    changed = [not torch.equal(p0, p1) for p0, p1 in zip(before.vision_model.parameters(),
                                                         after.vision_model.parameters())]
    assert sum(changed) > 0.9 * len(changed), "vision tower did not train"
    assert trainer.text_cache is not None and trainer.text_cache.shape[0] == len(trainer.train_dataset.captions)


def test_final_model_reloads_with_same_embeddings(hub_siglip, demo_dir, tmp_path):
    trainer = main(_args(hub_siglip, tmp_path, demo_dir / "stage0_train.json", max_steps=2))
    final = tmp_path / "final_model"
    for f in ("vision_encoder.bin", "model.safetensors", "config.json", "preprocessor_config.json",
              "tokenizer_config.json"):
        assert (final / f).exists(), f
    reloaded = SiglipModel.from_pretrained(final).eval()
    mem = trainer.encoder.model.eval()
    x = torch.stack([trainer.train_dataset[i]["pixel_values"] for i in range(4)])
    with torch.no_grad():
        a = mem.image(x)
        b = reloaded.get_image_features(pixel_values=x).pooler_output
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    sd = torch.load(final / "vision_encoder.bin")
    assert all(torch.equal(sd[k], v) for k, v in mem.image.backbone.state_dict().items())


def test_resume_matches_uninterrupted_run(hub_siglip, demo_dir, tmp_path):
    common = dict(num_epochs=2, checkpointing_steps=3, checkpoints_total_limit=20, seed=7)
    full = main(_args(hub_siglip, tmp_path / "full", demo_dir / "stage0_train.json", **common))
    # a run that "died" after step 3: only its step_3 checkpoint survives (mid-epoch 1)
    ckpt = tmp_path / "full" / "checkpoints" / "step_3"
    assert ckpt.exists()
    shutil.copytree(ckpt, tmp_path / "resumed" / "checkpoints" / "step_3")
    resumed = main(_args(hub_siglip, tmp_path / "resumed", demo_dir / "stage0_train.json",
                         resume_from_checkpoint="latest", **common))
    for (n, a), b in zip(full.encoder.model.named_parameters(), resumed.encoder.model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=n)


def test_training_lowers_val_loss_and_raises_recall(hub_siglip, short_caption_jsons, tmp_path):
    """Stand-in for a pretrained checkpoint: train the tiny SigLIP jointly, then run the seed's
    frozen-text fine-tune from it with a fresh vision tower, and compare with its start."""
    train, val = short_caption_jsons["train"], short_caption_jsons["val"]
    main(_args(hub_siglip, tmp_path / "joint", train, num_epochs=6, no_freeze_text_encoder=True,
               no_freeze_logit_scale=True))
    start = tmp_path / "joint" / "final_model"
    trainer = main(_args(start, tmp_path / "ft", train, val, num_epochs=6, reinit_vision_tower=True,
                         seed=3))
    # the fine-tune's own starting point: same checkpoint, same seeded re-initialisation
    from Stage0.towers import load_model
    from Stage0.train_vision_encoder_stage0 import reinit_image_backbone
    torch.manual_seed(3)
    model = load_model(start)[0]
    reinit_image_backbone(model)
    untrained = DualEncoder(model)
    before = evaluate_contrastive(untrained, trainer.val_dataset, 16, "cpu")
    after = evaluate_contrastive(trainer.encoder, trainer.val_dataset, 16, "cpu")
    print("before", before, "\nafter", after)
    assert after["loss"] < before["loss"] - 0.5
    assert after["i2t_R@1"] > before["i2t_R@1"] + 0.1


def test_sentencepiece_siglip_tokenizer_and_checkpoint_text_length(demo_dir, tmp_path):
    """Real SigLIP checkpoints ship a sentencepiece SiglipTokenizer and fix their own text
    length; captions are padded to exactly that length and longer ones truncated."""
    from transformers import SiglipTokenizer

    from scripts.demo.make_tiny_models import _texts_from_files, build_tiny_siglip
    texts = _texts_from_files([demo_dir / "stage0_train.json"])
    model_dir = build_tiny_siglip(tmp_path / "spm_siglip", texts, image_size=32, hidden_size=32,
                                  num_layers=1, num_heads=2, text_len=24, tokenizer_kind="sentencepiece")
    init = SiglipModel.from_pretrained(model_dir)
    assert init.logit_scale.item() == pytest.approx(torch.log(torch.tensor(10.0)).item())
    assert init.logit_bias.item() == -10.0  # the SigLIP paper's init for new scale/bias
    trainer = main(_args(model_dir, tmp_path / "out", demo_dir / "stage0_train.json", max_steps=1))
    assert isinstance(trainer.tokenizer, SiglipTokenizer)
    ds = trainer.train_dataset
    assert ds.input_ids.shape[1] == init.config.text_config.max_position_embeddings == 24
    long_rows = [i for i, c in enumerate(ds.captions) if len(trainer.tokenizer(c)["input_ids"]) > 24]
    assert long_rows, "demo captions should exceed 24 tokens"
    # truncated to content + the closing </s> (which SigLIP also uses as padding)
    assert (ds.input_ids[long_rows, :-1] != trainer.tokenizer.pad_token_id).all()
    assert (ds.input_ids[long_rows, -1] == trainer.tokenizer.eos_token_id).all()
    # requesting more than the checkpoint's positions is capped, with no crash
    from Stage0.towers import text_length
    assert text_length(trainer.encoder.model.text, trainer.tokenizer, 100) == 24


def _final_weights(out):
    from safetensors.torch import load_file
    return load_file(out / "final_model" / "model.safetensors")


def _assert_same_weights(a, b, atol):
    assert a.keys() == b.keys()
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst <= atol, f"max weight difference {worst}"


@pytest.mark.parametrize("captions", ["demo", "repeated"])
def test_gradient_accumulation_is_exact_with_frozen_text(captions, hub_siglip, demo_dir, short_caption_jsons,
                                                          tmp_path):
    """4 micro-batches of 4 meet every caption of the step, so they train exactly like one
    batch of 16 (a per-micro-batch loss would see 4 captions and drift). With repeated captions
    (a few canonical ones), every copy in any micro-batch is a positive."""
    train = demo_dir / "stage0_train.json" if captions == "demo" else short_caption_jsons["train"]
    main(_args(hub_siglip, tmp_path / "big", train, max_steps=3, batch_size=16, seed=5))
    main(_args(hub_siglip, tmp_path / "accum", train, max_steps=3, batch_size=4,
               gradient_accumulation_steps=4, seed=5))
    # Float summation order differs, and AdamW's g/sqrt(v) amplifies that where v is tiny, to
    # ~1e-5. Micro-batches that saw only their own captions would differ by ~lr*steps = 3e-3.
    _assert_same_weights(_final_weights(tmp_path / "big"), _final_weights(tmp_path / "accum"), atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("captions,text", [("demo", "frozen"), ("repeated", "frozen"), ("repeated", "trained")])
def test_two_processes_train_like_one_on_the_union_batch(captions, text, hub_siglip, demo_dir, short_caption_jsons,
                                                         tmp_path):
    """The whole trainer under DDP (2 CPU processes, gloo): each process's images meet both
    processes' captions, so 2 x 8 ends with the weights of 1 x 16. With repeated captions the
    copies of one caption sit on both ranks and are positives on both."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    train = demo_dir / "stage0_train.json" if captions == "demo" else short_caption_jsons["train"]
    kw = {"no_freeze_text_encoder": True} if text == "trained" else {}
    # Validation on both processes, each on its share of an odd-sized val set: the 1-process metrics.
    val = tmp_path / "val.json"
    val.write_text(json.dumps(json.loads((demo_dir / "stage0_val.json").read_text())[:21]))
    val_kw = {}
    if captions == "demo":  # one whole epoch of 3 steps, then validation
        train = tmp_path / "train48.json"
        train.write_text(json.dumps(json.loads((demo_dir / "stage0_train.json").read_text())[:48]))
        val_kw = {"val_json": val, "num_epochs": 1, "image_root": demo_dir}
    main(_args(hub_siglip, tmp_path / "one", train, max_steps=3, batch_size=16, seed=5, **kw, **val_kw))
    argv = _args(hub_siglip, tmp_path / "two", train, max_steps=3, batch_size=8, seed=5, **kw, **val_kw)
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # ACCELERATE_USE_CPU: what `accelerate launch --cpu` sets; it makes accelerate use gloo
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root), "ACCELERATE_USE_CPU": "true"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_addr", "127.0.0.1", "--master_port", str(port), str(root / "Stage0" / "train_vision_encoder_stage0.py"), *argv],
                          cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "processes=2" in proc.stderr
    _assert_same_weights(_final_weights(tmp_path / "one"), _final_weights(tmp_path / "two"), atol=1e-4)
    if val_kw:
        one, two = ([json.loads(line) for line in (tmp_path / n / "metrics.jsonl").read_text().splitlines()
                     if "val/loss" in line] for n in ("one", "two"))
        assert len(one) == len(two) == 2  # before training and after the epoch
        for a, b in zip(one, two):
            for k, v in a.items():
                assert b[k] == pytest.approx(v, rel=1e-3, abs=1e-6), k


def test_bad_rows_fail_before_training_naming_file_and_row(hub_siglip, demo_dir, tmp_path):
    import json
    rows = json.loads((demo_dir / "stage0_train.json").read_text())[:5]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(rows[:3] + [{"image": rows[3]["image"]}] + rows[4:]))
    with pytest.raises(ValueError, match=r"bad\.json row 3: missing or empty \['caption'\]"):
        main(_args(hub_siglip, tmp_path / "o", bad, max_steps=1, image_root=demo_dir))
    bad.write_text(json.dumps(rows[:2] + [{**rows[2], "image": "images/nope.png"}]))
    with pytest.raises(ValueError, match=r"bad\.json row 2: Cannot load image .*nope\.png.*--image_root"):
        main(_args(hub_siglip, tmp_path / "o", bad, max_steps=1, image_root=demo_dir))


def test_fp16_overflow_is_skipped_through_the_scaler_and_training_goes_on(hub_siglip, demo_dir, tmp_path,
                                                                           monkeypatch):
    """fp16 as on a GPU (a GradScaler), with an inf loss planted in step 2: the scaler skips that
    step and lowers its scale, and the run goes on (it used to raise `unscale_() has already been
    called` on the next step)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    import accelerator_setup
    import Stage0.trainer as stage0_trainer

    class ScaledAccelerator(Accelerator):  # accelerate builds a GradScaler for GPUs only
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.scaler, self.native_amp = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8), True

    real, calls = stage0_trainer.siglip_loss, []

    def planted(*a, **k):
        calls.append(1)
        loss = real(*a, **k)
        return loss * float("inf") if len(calls) == 2 else loss

    monkeypatch.setattr(accelerator_setup, "Accelerator", ScaledAccelerator)
    monkeypatch.setattr(stage0_trainer, "siglip_loss", planted)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    try:
        trainer = main(_args(hub_siglip, tmp_path, demo_dir / "stage0_train.json", max_steps=4,
                             mixed_precision="fp16"))
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
    assert trainer.stepper.steps_taken == 3
    assert trainer.accelerator.scaler.get_scale() == 2.0 ** 7
    assert all(torch.isfinite(p).all() for p in trainer.encoder.model.parameters())


def test_repeated_captions_are_positives_unless_asked_otherwise(hub_siglip, short_caption_jsons, tmp_path,
                                                              monkeypatch):
    """Stage0 hands the loss caption ids: two rows with one caption are positives for each other.
    `--duplicate_captions negative` gives the paper's one-positive-per-row loss."""
    import Stage0.trainer as stage0_trainer
    seen = []
    real = stage0_trainer.siglip_loss

    def spy(*a, **k):
        seen.append(k)
        return real(*a, **k)
    monkeypatch.setattr(stage0_trainer, "siglip_loss", spy)
    train = short_caption_jsons["train"]
    main(_args(hub_siglip, tmp_path / "pos", train, max_steps=1))
    assert "image_labels" in seen[-1]
    ids = seen[-1]["text_labels"]
    assert len(set(ids.tolist())) < len(ids), "the batch should repeat captions"
    main(_args(hub_siglip, tmp_path / "neg", train, max_steps=1, duplicate_captions="negative"))
    assert "positive_index" in seen[-1] and "image_labels" not in seen[-1]


def test_lora_trains_only_adapters_on_both_towers_and_merges_exactly(hub_siglip, demo_dir, tmp_path):
    """LoRA on both SigLIP encoders (never the vision pooling head's MultiheadAttention): only
    the adapters change, and the merged SiglipModel gives the adapted model's embeddings."""
    before = SiglipModel.from_pretrained(hub_siglip).state_dict()
    trainer = main(_args(hub_siglip, tmp_path, demo_dir / "stage0_train.json", max_steps=3, lora_r=4,
                         lora_alpha=8, lora_dropout=0.0, learning_rate=1e-2))
    model = trainer.encoder.model.eval()
    names = [n for n, _ in model.siglip.named_parameters() if "lora_A" in n]
    assert any(n.startswith("text_model.") for n in names) and any(n.startswith("vision_model.") for n in names)
    assert not any(".head." in n for n in names)
    for n, p in model.siglip.named_parameters():
        if "lora_" not in n:
            key = n.replace(".base_layer", "")
            assert torch.equal(p, before[key]), f"{n} changed"
    assert any(p.abs().sum() > 0 for n, p in model.siglip.named_parameters() if "lora_B" in n)
    merged = SiglipModel.from_pretrained(tmp_path / "final_model").eval()
    assert (tmp_path / "final_model" / "lora_adapter" / "adapter_model.safetensors").is_file()
    ds = trainer.train_dataset
    x = torch.stack([ds[i]["pixel_values"] for i in range(4)])
    with torch.no_grad():
        torch.testing.assert_close(merged.get_image_features(pixel_values=x).pooler_output, model.image(x),
                                   rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(merged.get_text_features(input_ids=ds.input_ids[:4]).pooler_output,
                                   model.text(ds.input_ids[:4], ds.attention_mask[:4]), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("damage", ["missing model.safetensors", "truncated optimizer.bin"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(damage, hub_siglip, demo_dir, tmp_path, capsys):
    """`latest` passes over a damaged newest checkpoint, with a warning naming it, and resumes
    from the previous one: the run still ends with the uninterrupted run's weights."""
    train = demo_dir / "stage0_train.json"
    common = dict(batch_size=16, seed=5, lr_scheduler="constant", warmup_steps=0)
    main(_args(hub_siglip, tmp_path / "full", train, max_steps=4, **common))
    main(_args(hub_siglip, tmp_path / "cut", train, max_steps=3, checkpointing_steps=1, **common))
    newest = tmp_path / "cut" / "checkpoints" / "step_3"
    if damage.startswith("missing"):
        (newest / "model.safetensors").unlink()
    else:
        data = (newest / "optimizer.bin").read_bytes()
        (newest / "optimizer.bin").write_bytes(data[: len(data) // 3])
    capsys.readouterr()
    main(_args(hub_siglip, tmp_path / "cut", train, max_steps=4, resume_from_checkpoint="latest", **common))
    err = capsys.readouterr().err
    assert "step_3 is damaged" in err and "resumed from" in err and "step_2" in err
    _assert_same_weights(_final_weights(tmp_path / "full"), _final_weights(tmp_path / "cut"), atol=0)


@pytest.mark.parametrize("text", ["frozen", "trained"])
def test_checkpointing_and_compile_train_the_same_weights(text, hub_siglip, demo_dir, tmp_path, capsys):
    """--gradient_checkpointing recomputes the trained towers' blocks and --torch_compile
    (traced with the eager backend here) compiles every block the step runs: same weights."""
    torch._dynamo.reset()
    train = demo_dir / "stage0_train.json"
    kw = {"max_steps": 3, "seed": 3} | ({"no_freeze_text_encoder": True} if text == "trained" else {})
    main(_args(hub_siglip, tmp_path / "plain", train, **kw))
    capsys.readouterr()
    trainer = main(_args(hub_siglip, tmp_path / "fast", train, gradient_checkpointing=True, torch_compile=True,
                         torch_compile_backend="eager", **kw))
    _assert_same_weights(_final_weights(tmp_path / "plain"), _final_weights(tmp_path / "fast"), atol=1e-6)
    err = capsys.readouterr().err
    assert "graphs after 3 warm-up steps" in err and "recompiled after the warm-up" not in err  # fixed shapes
    model = getattr(trainer.encoder, "module", trainer.encoder).model
    from transformers.modeling_layers import GradientCheckpointingLayer

    def blocks(m):
        return [b for b in m.modules() if isinstance(b, GradientCheckpointingLayer)]
    assert blocks(model.image) and all(b.gradient_checkpointing for b in blocks(model.image))
    assert all(b._compiled_call_impl is not None for b in blocks(model.image))
    assert all((b._compiled_call_impl is not None) == (text == "trained") for b in blocks(model.text))
