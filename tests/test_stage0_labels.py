"""The labelled recipe (seed 004) end to end: skin-lesion phantoms, classes file, label-aware
losses with LoRA on both SigLIP towers, the class-retrieval evaluation."""
import csv
import json

import pytest

from scripts.make_demo_data import main as make_demo
from scripts.make_tiny_models import build_tiny_siglip
from Stage0.evaluate_stage0 import main as evaluate
from Stage0.labels import class_text, read_classes
from Stage0.train_vision_encoder_stage0 import main


@pytest.fixture(scope="module")
def derm(tmp_path_factory):
    root = tmp_path_factory.mktemp("derm")
    csv_path = make_demo(["--recipe", "derm", "--out_dir", str(root / "data"), "--num_images", "400",
                          "--image_size", "64", "--seed", "0"])
    classes = read_classes(csv_path.parent / "classes.csv")
    texts = [class_text(c, classes) for c in classes] * 5
    siglip = build_tiny_siglip(root / "siglip", texts, image_size=64, hidden_size=64, num_layers=2, num_heads=2)
    # a few unlabelled rows: dropped and counted
    rows = list(csv.DictReader(open(csv_path)))
    with open(root / "data" / "with_blanks.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows + [{**rows[0], "labels": ""}, {**rows[1], "labels": " ; "}])
    return {"csv": root / "data" / "with_blanks.csv", "classes": csv_path.parent / "classes.csv", "siglip": siglip}


@pytest.fixture(scope="module")
def lora_run(derm, tmp_path_factory):
    out = tmp_path_factory.mktemp("derm_run")
    trainer = main(["--model_name", str(derm["siglip"]), "--csv_file", str(derm["csv"]), "--label_column", "labels",
                    "--classes_file", str(derm["classes"]), "--loss", "multi_positive,weighted,icd,wasserstein,hard_negative",
                    "--pos_weight", "2", "--ramp_steps", "0,20,40,60", "--lora_r", "8", "--lora_alpha", "16",
                    "--no_freeze_logit_scale", "--output_dir", str(out), "--batch_size", "32", "--epochs", "6",
                    "--learning_rate", "5e-3", "--report_to", "none", "--num_workers", "0", "--no-save_epoch_models",
                    "--logging_steps", "10"])
    return trainer, out


def test_short_lora_run_beats_the_untrained_model(derm, lora_run, tmp_path, caplog):
    trainer, out = lora_run
    data = out / "labelled_data.csv"
    rows = list(csv.DictReader(open(data)))
    assert {r["split"] for r in rows} == {"train", "val", "test"}
    test_paths = {r["img_path"] for r in rows if r["split"] == "test"}
    assert not test_paths & {r["img_path"] for r in rows if r["split"] == "train"}  # no test image in train
    assert len(rows) > 400  # rare classes oversampled in train
    results = {}
    for name, model in (("untrained", derm["siglip"]), ("lora", out / "final_model")):
        result = tmp_path / f"{name}.json"
        evaluate(["--model_path", str(model), "--csv_file", str(data), "--label_column", "labels", "--classes_file",
                  str(derm["classes"]), "--split", "test", "--output_json", str(result)])
        results[name] = json.loads(result.read_text())
        assert result.with_suffix(".md").is_file()
    before, after = results["untrained"], results["lora"]
    assert set(after) >= {"accuracy", "macro_precision", "macro_recall", "macro_f1", "R@1", "R@5", "distractor_top1",
                          "per_class"}
    assert after["macro_f1"] > before["macro_f1"] + 0.05, (before, after)
    assert after["R@1"] > before["R@1"] + 0.1, (before, after)


def test_every_term_and_coefficient_is_logged(lora_run):
    _, out = lora_run
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "train/loss/sigmoid" in line]
    last = rows[-1]
    for k in ("train/loss/sigmoid", "train/loss/icd", "train/loss/wasserstein", "train/loss/hard_negative",
              "train/coef/alpha", "train/coef/beta", "train/coef/gamma"):
        assert k in last, k
    from losses import ramp_coefficients
    for r in rows:  # the coefficients of the step the row logs (the optimizer step index is step - 1)
        expected = ramp_coefficients(r["step"] - 1, (0, 20, 40, 60), 0.3, 0.1, 0.1)
        got = (r["train/coef/alpha"], r["train/coef/beta"], r["train/coef/gamma"])
        assert got == pytest.approx(expected)
    assert rows[0]["train/coef/alpha"] < 0.3 and rows[-1]["train/coef/alpha"] == pytest.approx(0.3)


def test_unlabelled_rows_are_dropped_and_counted(derm, lora_run):
    _, out = lora_run
    n_in = sum(1 for _ in csv.DictReader(open(derm["csv"])))
    kept = {r["img_path"] for r in csv.DictReader(open(out / "labelled_data.csv"))}
    assert n_in == 402 and len(kept) == 400


def test_derm_launcher_runs_the_seed(tmp_path):
    from test_stage0_ct import _launch_argv
    from Stage0.train_vision_encoder_stage0 import parse_args
    args = parse_args(_launch_argv("scripts/run_derm_lora.sh", tmp_path))
    assert args.label_column == "labels" and args.lora_r == 16 and args.ramp_steps == "0,1000,2000,2500"
    assert args.loss == "multi_positive,icd,wasserstein,hard_negative" and args.oversample_min == 30


def test_cxr_demo_findings_are_a_labelled_example(demo_dir, tmp_path):
    """The CXR demo's multi-label findings with their ICD-10 codes feed the labelled recipe."""
    from Stage0.labels import prepare_labelled_csv
    out, names, classes = prepare_labelled_csv(demo_dir / "demo.csv", "", "img_path", "labels",
                                               demo_dir / "classes.csv", tmp_path / "cxr.csv", oversample_min=0)
    assert names == sorted(["cardiomegaly", "pleural_effusion", "consolidation", "nodule", "pneumothorax"])
    assert classes["pleural_effusion"]["icd10"] == "J90"
    rows = list(csv.DictReader(open(out)))
    assert any(";" in r["labels"] for r in rows)  # multi-label rows
    assert all(r["split"] in ("train", "val", "test") for r in rows)


def test_an_image_in_both_train_and_test_is_refused(derm, tmp_path):
    from Stage0.labels import prepare_labelled_csv
    rows = list(csv.DictReader(open(derm["csv"])))[:30]
    for r, s in zip(rows, ["train", "test"] * 15):
        r["split"] = s
    rows[1]["img_path"] = rows[0]["img_path"]
    bad = tmp_path / "leak.csv"
    with bad.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    with pytest.raises(ValueError, match="both train and test"):
        prepare_labelled_csv(bad, derm["csv"].parent, "img_path", "labels", derm["classes"], tmp_path / "o.csv")


def test_a_missing_image_in_the_labelled_file_is_named_there_and_can_be_skipped(derm, tmp_path):
    """The labelled recipe reads the user's CSV into a training CSV first: a missing image is
    reported against the user's file and line (not the generated one), and skip drops it."""
    from data_check import BadDataError
    rows = list(csv.DictReader(open(derm["csv"])))[:60]
    rows[6]["img_path"] = "images/not_there.png"
    bad = derm["csv"].parent / "one_missing.csv"
    with bad.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    argv = ["--model_name", str(derm["siglip"]), "--csv_file", str(bad), "--label_column", "labels",
            "--classes_file", str(derm["classes"]), "--batch_size", "8", "--max_steps", "2", "--report_to", "none",
            "--num_workers", "0", "--no-save_epoch_models"]
    with pytest.raises(BadDataError, match=r"one_missing\.csv line 8: .*not_there\.png"):
        main(argv + ["--output_dir", str(tmp_path / "error")])
    main(argv + ["--output_dir", str(tmp_path / "skip"), "--on_bad_sample", "skip"])
    dropped = json.loads((tmp_path / "skip" / "dropped_rows.json").read_text())
    assert [(r["file"], r["row"]) for r in dropped["rows"]] == [(str(bad), "line 8")]


def test_derm_recipe_on_two_processes_and_exact_resume(derm, tmp_path):
    """The labelled recipe (label-aware losses, LoRA on both towers) under `accelerate launch
    --num_processes 2`, and cut after step 3 of 6 then resumed to the uninterrupted weights."""
    import shutil

    import torch

    from conftest import accelerate_two_processes, assert_sharded_run
    base = ["--model_name", str(derm["siglip"]), "--csv_file", str(derm["csv"]), "--label_column", "labels",
            "--classes_file", str(derm["classes"]), "--loss", "multi_positive,weighted,icd",
            "--lora_r", "4", "--batch_size", "16", "--report_to", "none", "--num_workers", "0",
            "--no-save_epoch_models", "--logging_steps", "5"]
    out = tmp_path / "two"
    proc = accelerate_two_processes("Stage0/train_vision_encoder_stage0.py", base + ["--output_dir", out, "--epochs", "1"])
    train_rows = sum(r["split"] == "train" for r in csv.DictReader(open(out / "labelled_data.csv")))
    assert_sharded_run(proc, out, train_rows, batch_size=16)

    flags = ["--max_steps", "6", "--checkpointing_steps", "3", "--checkpoints_total_limit", "5"]
    full = main(base + flags + ["--output_dir", str(tmp_path / "full")])
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step_3", tmp_path / "cut" / "checkpoints" / "step_3")
    resumed = main(base + flags + ["--output_dir", str(tmp_path / "cut"), "--resume_from_checkpoint", "latest"])
    for (n, a), b in zip(full.encoder.model.named_parameters(), resumed.encoder.model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=n)
