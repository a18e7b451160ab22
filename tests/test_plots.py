"""Every picture is written as a valid PNG: a run's training curves (also through
scripts/plot_run.py), Stage2's accuracy chart and example page, Stage0's ROC curves and
confusion matrix."""
import json

import numpy as np
import pytest
from PIL import Image

import cli
import plots


def assert_png(path):
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000, path
    with Image.open(path) as im:
        im.verify()


def _run(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    lines = [json.dumps({"step": 0, "val/loss": 2.0})]
    lines += [json.dumps({"step": s, "train/loss": 2.0 / s, "train/lr": 1e-3 * (1 - s / 40), "epoch": 0})
              for s in range(1, 40)]
    lines += [json.dumps({"step": 40, "val/loss": 0.5, "val/R@1": 0.4}), '{"step": 41, "train/lo']  # cut short
    (run / "metrics.jsonl").write_text("\n".join(lines))
    return run


def test_training_curves_from_metrics_jsonl_and_the_cli(tmp_path, capsys):
    from scripts.plot_run import main
    run = _run(tmp_path)
    assert [r["step"] for r in plots.read_metrics(run)][-1] == 40  # the cut-short line is passed over
    path = main([str(run)])
    assert path == run / "training_curves.png" and str(path) in capsys.readouterr().out
    assert_png(path)
    with pytest.raises(SystemExit):
        cli.run(main, [str(tmp_path / "nowhere")])
    err = capsys.readouterr().err
    assert "metrics.jsonl: no such file" in err and len(err.strip().splitlines()) == 1


def test_evaluation_pictures(tmp_path):
    summary = {"n": 6, "closed": {"n": 4, "accuracy": 0.75, "majority_accuracy": 0.5,
                                  "by_finding": {"cardiomegaly": 1.0, "nodule": 0.5}},
               "open": {"n": 2, "accuracy": 0.0}, "all": {"n": 6, "accuracy": 0.5}}
    assert_png(plots.vqa_accuracy(summary, tmp_path / "vqa.png"))
    Image.fromarray(np.arange(48 * 40, dtype=np.uint8).reshape(48, 40) % 255).save(tmp_path / "x.png")
    records = [{"image": "x.png", "question": "Is there cardiomegaly?", "prediction": "yes", "reference": "no",
                "correct": False}] * 3
    assert_png(plots.vqa_examples(records, tmp_path, tmp_path / "examples.png"))
    curves = {"effusion": ([0, 0.2, 1], [0, 0.8, 1], 0.8), "nodule": ([0, 0.5, 1], [0, 0.5, 1], 0.5)}
    assert_png(plots.roc_curves(curves, tmp_path / "roc.png"))
    assert_png(plots.confusion([[3, 1], [0, 2]], ["a", "b"], tmp_path / "confusion.png"))


def test_stage0_evaluation_writes_a_roc_picture_per_model(demo_dir, tiny_siglip, tmp_path):
    from Stage0.evaluate_stage0 import main
    out = tmp_path / "metrics.json"
    results = main(["--model_path", str(tiny_siglip), "--labels", "tiny", "--test_json",
                    str(demo_dir / "stage0_test.json"), "--image_root", str(demo_dir), "--findings_json",
                    str(demo_dir / "findings.json"), "--output_json", str(out), "--device", "cpu"])
    assert "AUC cardiomegaly" in results["tiny"]
    assert_png(tmp_path / "metrics_roc_tiny.png")
