"""The labelled recipe (seed 004) end to end: skin-lesion phantoms, classes file, label-aware
losses with LoRA on both SigLIP towers, the class-retrieval evaluation."""
import csv
import json

import pytest
import torch

from scripts.demo.make_demo_data import main as make_demo
from scripts.demo.make_tiny_models import build_tiny_siglip
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
    # bf16 weights, as SigLIP towers are stored in MedGemma and bf16 fine-tunes: LoRA merges into
    # them. (hub_shaped's sentencepiece tokenizer, trained on these few class texts, has too few
    # pieces: most captions would exceed the 64 tokens.)
    siglip = build_tiny_siglip(root / "siglip", texts, image_size=64, hidden_size=64, num_layers=2, num_heads=2,
                               dtype=torch.bfloat16)
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
        assert (result.parent / f"{result.stem}_confusion.png").stat().st_size > 1000
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
    from conftest import launch_argv
    from Stage0.train_vision_encoder_stage0 import parse_args
    args = parse_args(launch_argv("scripts/run_derm_lora.sh", tmp_path))
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
    # its prompts are radiology's, one per finding, not the dermatology seed's wording
    from scripts.demo.make_demo_data import CLASS_PROMPT_TEMPLATE
    from Stage0.labels import class_texts
    texts = class_texts(names, classes, CLASS_PROMPT_TEMPLATE)
    assert texts[names.index("pleural_effusion")] == "Chest X-ray showing pleural effusion."
    assert len(set(texts)) == len(names)
    out, _, _ = prepare_labelled_csv(demo_dir / "demo.csv", "", "img_path", "labels", demo_dir / "classes.csv",
                                     tmp_path / "cxr2.csv", oversample_min=0, template=CLASS_PROMPT_TEMPLATE)
    captions = {r["caption"] for r in csv.DictReader(open(out))}
    assert "Chest X-ray showing cardiomegaly." in captions
    assert not any("dermatolog" in c or "Clinical presentation" in c for c in captions)


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


@pytest.mark.slow
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


def _short_run(derm, out, *extra):
    return ["--model_name", str(derm["siglip"]), "--csv_file", str(derm["csv"]), "--label_column", "labels",
            "--classes_file", str(derm["classes"]), "--batch_size", "64", "--report_to", "none",
            "--num_workers", "0", "--no-save_epoch_models", "--oversample_min", "0", "--output_dir", str(out),
            *extra]


def test_class_prompts_identical_after_truncation_are_refused_before_training(derm, tmp_path, capsys):
    """Truncated to the text tower's length, the seed's prompts keep only their shared prefix
    ("Clinical presentation of"): every class would train on one text and score chance."""
    import cli
    out = tmp_path / "short"
    with pytest.raises(SystemExit) as e:
        cli.run(main, _short_run(derm, out, "--max_text_length", "4", "--max_steps", "1"))
    assert e.value.code == 2
    errors = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, errors
    assert all(c in errors[0] for c in read_classes(derm["classes"])), errors[0]
    assert "--class_prompt_template" in errors[0] and "{condition}" in errors[0]
    assert not (out / "final_model").exists() and not (out / "checkpoints").exists()
    assert not (out / "metrics.jsonl").exists()


TEMPLATE = "Skin photo of {condition}."


@pytest.fixture(scope="module")
def templated_run(derm, tmp_path_factory):
    out = tmp_path_factory.mktemp("templated")
    main(_short_run(derm, out, "--class_prompt_template", TEMPLATE, "--epochs", "1"))
    return out


def test_class_prompt_template_is_recorded_and_evaluation_scores_the_training_prompts(derm, templated_run,
                                                                                     tmp_path, caplog):
    out = templated_run
    expected = {c: TEMPLATE.format(condition=c) for c in read_classes(derm["classes"])}
    # what training embedded: the captions of single-label rows are their class's prompt
    trained = {r["labels"]: r["caption"] for r in csv.DictReader(open(out / "labelled_data.csv"))
               if ";" not in r["labels"]}
    assert trained == expected
    for folder in ("final_model", "best_model"):
        record = json.loads((out / folder / "class_prompts.json").read_text())
        assert record["template"] == TEMPLATE and record["prompts"] == expected
    result = tmp_path / "eval.json"
    evaluate(["--model_path", str(out / "final_model"), "--csv_file", str(out / "labelled_data.csv"),
              "--label_column", "labels", "--classes_file", str(derm["classes"]), "--split", "test",
              "--output_json", str(result)])
    assert json.loads(result.read_text())["class_prompts"] == expected
    assert not [r for r in caplog.records if "differs from training" in r.getMessage()]
    # told otherwise, evaluation uses the flag and says that it is not what the model trained on
    evaluate(["--model_path", str(out / "final_model"), "--csv_file", str(out / "labelled_data.csv"),
              "--label_column", "labels", "--classes_file", str(derm["classes"]), "--split", "test",
              "--class_prompt_template", "{condition}", "--output_json", str(result), "--force"])
    assert json.loads(result.read_text())["class_prompts"] == {c: c for c in expected}
    warned = [r.getMessage() for r in caplog.records if "differs from training" in r.getMessage()]
    assert len(warned) == 1 and TEMPLATE in warned[0], warned


def test_inference_ranks_the_training_class_prompts(derm, templated_run, tmp_path):
    from Stage0.inference_stage0 import main as infer
    expected = [TEMPLATE.format(condition=c) for c in sorted(read_classes(derm["classes"]))]
    image = next(csv.DictReader(open(templated_run / "labelled_data.csv")))["img_path"]
    ranked = infer(["--model_path", str(templated_run / "final_model"), "--image_path", image])
    assert sorted(q for q, _ in ranked) == sorted(expected)
    out = tmp_path / "pred.csv"
    infer(["--model_path", str(templated_run / "final_model"), "--csv_path", str(derm["csv"]),
           "--classes_file", str(derm["classes"]), "--output_path", str(out)])
    header = next(csv.reader(open(out)))
    assert header[3:] == expected


def _with_unknown_labels(derm, path):
    rows = list(csv.DictReader(open(derm["csv"])))[:80]
    for r in rows[:3]:
        r["labels"] = "tinea corporis"
    rows[3]["labels"] = "wart;" + rows[3]["labels"]
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def test_labels_missing_from_the_classes_file_are_warned_or_refused(derm, tmp_path, caplog, capsys):
    import cli
    from Stage0.labels import prepare_labelled_csv
    data = _with_unknown_labels(derm, derm["csv"].parent / "unknown_labels.csv")
    caplog.clear()
    _, names, _ = prepare_labelled_csv(data, derm["csv"].parent, "img_path", "labels", derm["classes"],
                                       tmp_path / "o.csv", oversample_min=0)
    assert {"tinea corporis", "wart"} <= set(names)  # warned, then kept as classes of their own
    warned = [r.getMessage() for r in caplog.records if "not in" in r.getMessage()]
    assert len(warned) == 1 and "tinea corporis (3 rows)" in warned[0] and "wart (1 row)" in warned[0], warned
    with pytest.raises(ValueError, match=r"tinea corporis \(3 rows\).*wart \(1 row\)"):
        prepare_labelled_csv(data, derm["csv"].parent, "img_path", "labels", derm["classes"], tmp_path / "o.csv",
                             unknown_labels="error")
    # evaluation warns the same way (K grows by the unknown labels), or refuses with one line
    evaluation = ["--model_path", str(derm["siglip"]), "--csv_file", str(data), "--image_root",
                  str(derm["csv"].parent), "--label_column", "labels", "--classes_file", str(derm["classes"])]
    caplog.clear()
    m = evaluate(evaluation)
    warned = [r.getMessage() for r in caplog.records if "not in" in r.getMessage()]
    assert len(warned) == 1 and "tinea corporis (3 rows)" in warned[0], warned
    assert m["n_classes"] == len(read_classes(derm["classes"])) + 2
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli.run(evaluate, evaluation + ["--unknown_labels", "error"])
    errors = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert e.value.code == 2 and len(errors) == 1 and "wart (1 row)" in errors[0], errors
    # training refuses before it trains
    with pytest.raises(SystemExit) as e:
        cli.run(main, ["--model_name", str(derm["siglip"]), "--csv_file", str(data), "--image_root",
                       str(derm["csv"].parent), "--label_column", "labels", "--classes_file", str(derm["classes"]),
                       "--unknown_labels", "error", "--report_to", "none", "--output_dir", str(tmp_path / "run")])
    errors = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("error:")]
    assert e.value.code == 2 and len(errors) == 1 and "tinea corporis (3 rows)" in errors[0], errors
    assert not (tmp_path / "run" / "final_model").exists()
