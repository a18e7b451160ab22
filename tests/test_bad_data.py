"""Bad data: each kind of bad row is found before the first step, listed all at once under
--on_bad_sample error, dropped and recorded under skip; a file that breaks after the check is
replaced under skip and named under error; scripts/data/validate_data.py for every stage's files.

The datasets are built from the demo data with the tiny config-built towers; most cases call
data_check.check_datasets on them directly, and one Stage0 and one Stage2 training run end to end."""
import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pydicom
import pytest
import torch
from PIL import Image
from pydicom.data import get_testdata_file
from test_reliability_loop import _same_safetensors

import cli
import data_check
from data_check import BadDataError, DataFileError, check_datasets
from image_loader import ImageLoadError
from scripts.data.validate_data import main as validate_main
from scripts.demo.make_tiny_models import _texts_from_files, build_tiny_gemma3
from Stage0.dataset import ImageTextContrastiveDataset
from Stage0.merlin import VolumeProcessor
from Stage2.dataset import VQADataset
from volume_loader import check_input, load_input

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models on a shared machine
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def files(tmp_path_factory, demo_dir):
    """A copy of the demo images (tests break files of their own copies, never the shared demo),
    plus one file of every bad kind."""
    root = tmp_path_factory.mktemp("bad_data")
    img = root / "images"
    shutil.copytree(demo_dir / "images", img)
    good = img / "demo_00000.png"
    data = good.read_bytes()
    (img / "truncated.png").write_bytes(data[: len(data) // 2])
    (img / "notes.png").write_text("Findings: no acute process. (a report saved as .png)")
    Image.open(good).convert("RGB").save(img / "good.jpg", quality=90)
    jpg = (img / "good.jpg").read_bytes()
    (img / "truncated.jpg").write_bytes(jpg[: len(jpg) // 2])
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.save_as(img / "good.dcm")
    dcm = (img / "good.dcm").read_bytes()
    (img / "cut.dcm").write_bytes(dcm[: len(dcm) - 4000])
    del ds.PixelData
    ds.save_as(img / "report.dcm")  # a DICOM object without pixels (a structured report, say)
    vol = np.random.default_rng(0).normal(size=(1, 4, 8, 8)).astype(np.float32)
    np.savez(img / "vol.npz", image=vol)
    np.savez(img / "vol3d.npz", image=vol[0])
    np.savez(img / "flat.npz", image=vol[0, 0])
    np.savez(img / "wrong_key.npz", volume=vol)
    nan = vol.copy()
    nan[0, 1, 2, 3] = np.nan
    np.savez(img / "nan.npz", image=nan)
    return {"root": root, "demo": demo_dir, "stage0": json.loads((demo_dir / "stage0_train.json").read_text()),
            "stage2": json.loads((demo_dir / "stage2_train.json").read_text())}


@pytest.fixture(scope="module")
def parts(tiny_siglip):
    from transformers import AutoImageProcessor, AutoTokenizer
    return AutoImageProcessor.from_pretrained(tiny_siglip), AutoTokenizer.from_pretrained(tiny_siglip)


@pytest.fixture(scope="module")
def gemma(tmp_path_factory, demo_dir):
    return build_tiny_gemma3(tmp_path_factory.mktemp("gemma") / "gemma3", _texts_from_files(
        [demo_dir / "stage2_train.json"]), hidden_size=32, num_layers=1, num_heads=2, vocab_size=300)


def _write(path, rows):
    path.write_text(json.dumps(rows))
    return path


def _s0(path, root, parts, **kw):
    return ImageTextContrastiveDataset(path, root, parts[0], parts[1], max_length=16, collect_bad_rows=True, **kw)


def _acc(out):
    """What check_datasets needs of an Accelerator, for one process (a real one is global state)."""
    out.mkdir(parents=True, exist_ok=True)
    return SimpleNamespace(process_index=0, num_processes=1, is_main_process=True, is_local_main_process=True,
                           trackers=[], project_dir=str(out))


def _args(out, mode="error", full=False):
    return SimpleNamespace(on_bad_sample=mode, full_decode_check=full, output_dir=str(out))


# Every bad kind a row can have: (row, words its reason must hold). Rows 0-1 and 10-11 are good.
BAD_STAGE0 = [({"image": "images/absent.png", "caption": "x"}, "no such file"),
              ({"image": "images/truncated.png", "caption": "x"}, "no IEND chunk"),
              ({"image": "images/notes.png", "caption": "x"}, "not a recognised image format"),
              ({"image": "images/report.dcm", "caption": "x"}, "no pixel data"),
              ({"image": "images/demo_00003.png"}, "missing or empty ['caption']"),
              ({"image": "images/demo_00004.png", "caption": "  "}, "missing or empty ['caption']"),
              ({"image": "images/cut.dcm", "caption": "x"}, "truncated"),
              ({"image": "images/truncated.jpg", "caption": "x"}, "no end-of-image marker")]


def _stage0_files(files, tmp_path):
    good = [{"image": r["image"], "caption": r["caption"]} for r in files["stage0"][:6]]
    train = _write(tmp_path / "train.json", good[:2] + [r for r, _ in BAD_STAGE0] + good[2:4]
                   + [{"image": "images/good.jpg", "caption": "jpeg"}, {"image": "images/good.dcm", "caption": "ct"}])
    val = _write(tmp_path / "val.json", [good[4], {"image": "images/truncated.jpg", "caption": "x"}, good[5]])
    return train, val


# ---------------------------------------------------------------- the header checks

def test_header_checks_find_every_bad_file_and_pass_every_good_one(files):
    img = files["root"] / "images"
    for name in ("demo_00000.png", "good.jpg", "good.dcm", "vol.npz", "vol3d.npz"):
        check_input(img / name)
        check_input(img / name, full=True)
        load_input(img / name)
    bad = {"truncated.png": "truncated (it has no IEND chunk", "notes.png": "not a recognised image format",
           "truncated.jpg": "no end-of-image marker", "report.dcm": "no pixel data", "cut.dcm": "truncated",
           "absent.png": "no such file", "flat.npz": "expected (C, D, H, W)", "wrong_key.npz": "no 'image' array"}
    for name, words in bad.items():
        with pytest.raises(ImageLoadError, match=r"row 4 of d\.json") as e:
            check_input(img / name, row=4, source="d.json")
        assert name in str(e.value) and words in str(e.value), str(e.value)
        with pytest.raises(ImageLoadError):  # training's loader refuses every one of them too
            load_input(img / name)
    check_input(img / "nan.npz")  # finding NaN takes reading the volume: only a full check does
    with pytest.raises(ImageLoadError, match="NaN"):
        check_input(img / "nan.npz", full=True)


# ---------------------------------------------------------------- before training, on the datasets

def test_error_lists_every_bad_row_of_train_and_val_in_one_message(files, parts, tmp_path):
    train, val = _stage0_files(files, tmp_path)
    out = tmp_path / "run"
    train_ds, val_ds = _s0(train, files["root"], parts), _s0(val, files["root"], parts)
    with pytest.raises(BadDataError) as e:
        check_datasets(_acc(out), _args(out), train=train_ds, val=val_ds)
    msg = str(e.value)
    for i, (_, words) in enumerate(BAD_STAGE0, start=2):
        line = next((ln for ln in msg.splitlines() if f"{train} row {i}: " in ln), "")
        assert words in line, (i, words, msg)
    assert f"{val} row 1: " in msg and "end-of-image marker" in msg
    for ok in (0, 1, 10, 11, 12, 13):
        assert f"{train} row {ok}:" not in msg
    assert f"{val} row 0:" not in msg and f"{val} row 2:" not in msg
    assert msg.startswith("9 bad rows") and "--on_bad_sample skip" in msg
    assert cli.is_user_error(e.value)  # the CLIs print it without a traceback
    assert len(json.loads((out / "bad_rows.json").read_text())["rows"]) == 9
    assert not (out / "dropped_rows.json").exists()


def test_skip_drops_the_bad_rows_and_lists_them(files, parts, tmp_path):
    train, val = _stage0_files(files, tmp_path)
    out = tmp_path / "run"
    train_ds, val_ds = _s0(train, files["root"], parts), _s0(val, files["root"], parts)
    bad = check_datasets(_acc(out), _args(out, "skip"), train=train_ds, val=val_ds)
    assert len(bad) == 9
    assert [r["row"] for r in train_ds.rows] == [0, 1, 10, 11, 12, 13] and [r["row"] for r in val_ds.rows] == [0, 2]
    for ds in (train_ds, val_ds):  # captions, ids and tokens stay aligned after the drop
        assert all(ds.captions[int(ds.caption_ids[k])] == r["caption"] for k, r in enumerate(ds.rows))
        assert len(ds.captions) == len(set(r["caption"] for r in ds.rows)) == ds.input_ids.shape[0]
        assert all(ds[k]["pixel_values"].shape == (3, 64, 64) for k in range(len(ds)))
    report = json.loads((out / "dropped_rows.json").read_text())
    assert report["count"] == 9 and report["on_bad_sample"] == "skip"
    listed = {(r["file"], r["row"], r["split"]) for r in report["rows"]}
    assert listed == {(str(train), i, "train") for i in range(2, 10)} | {(str(val), 1, "val")}
    assert all(r["reason"] for r in report["rows"])
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics == [{"step": 0, "data/dropped_rows": 9}]


def test_a_fresh_image_cache_entry_vouches_for_its_source(files, parts, tmp_path, monkeypatch):
    """An image whose pre-resized cache entry was built from exactly this file (same size and
    mtime) decoded then, and training reads the entry: not checked again, not even under
    --full_decode_check; the others are decoded in full."""
    import image_cache
    monkeypatch.delenv(image_cache.ENV_VAR, raising=False)
    rows = [{"image": r["image"], "caption": r["caption"]} for r in files["stage0"][:4]]
    path = _write(tmp_path / "t.json", rows)
    target = image_cache.target_from_processor(parts[0])
    image_cache.build_cache([str(files["root"] / r["image"]) for r in rows[:2]], image_cache.cache_folder(path, target),
                            target, progress=False)
    calls, real = {}, data_check.check_input

    def spy(p, full=False, **kw):
        calls[Path(p).name] = full
        return real(p, full, **kw)
    monkeypatch.setattr(data_check, "check_input", spy)
    out = tmp_path / "run"
    assert check_datasets(_acc(out), _args(out, full=True), train=_s0(path, files["root"], parts)) == []
    assert calls == {Path(r["image"]).name: True for r in rows[2:]}


def test_a_long_list_is_cut_to_twenty_and_a_count(files, parts, tmp_path):
    rows = [{"image": f"images/gone_{i}.png", "caption": "x"} for i in range(25)] + [
        {"image": r["image"], "caption": r["caption"]} for r in files["stage0"][:2]]
    out = tmp_path / "run"
    with pytest.raises(BadDataError) as e:
        check_datasets(_acc(out), _args(out), train=_s0(_write(tmp_path / "t.json", rows), files["root"], parts))
    assert "row 19:" in str(e.value) and "row 20:" not in str(e.value) and "... and 5 more" in str(e.value)
    assert "bad_rows.json" in str(e.value) and len(json.loads((out / "bad_rows.json").read_text())["rows"]) == 25


def test_a_file_unusable_as_a_whole_stops_even_under_skip(files, parts, tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('[{"image": "images/demo_00000.png", "caption": "x"},')
    with pytest.raises(DataFileError, match=r"broken\.json: not valid JSON"):
        _s0(broken, files["root"], parts)
    (tmp_path / "obj.json").write_text('{"image": "images/demo_00000.png"}')
    with pytest.raises(DataFileError, match="expected a non-empty JSON list"):
        _s0(tmp_path / "obj.json", files["root"], parts)
    (tmp_path / "no_text.csv").write_text("img_path,labels\nimages/demo_00000.png,x\n")
    with pytest.raises(DataFileError, match=r"no_text\.csv: no column \['impression'\]"):
        _s0(tmp_path / "no_text.csv", files["root"], parts)
    (tmp_path / "binary.csv").write_bytes(b"img_path,impression\n\xff\xfe\x00\x81\x00garbage\n")
    with pytest.raises(DataFileError, match=r"binary\.csv: not a readable CSV"):
        _s0(tmp_path / "binary.csv", files["root"], parts)


def test_stage2_rows_with_an_empty_question_or_answer(files, tiny_siglip, gemma, tmp_path):
    from vlm import build_vlm
    model, tok, ip = build_vlm(tiny_siglip, gemma)
    good = [{k: r[k] for k in ("image", "problem", "normal_caption")} for r in files["stage2"][:3]]
    img = good[0]["image"]
    rows = good + [{"image": img, "problem": " ", "normal_caption": "yes"}, {"image": img, "normal_caption": "no"},
                   {"image": img, "problem": "Is there an effusion?", "normal_caption": ""},
                   {"image": "images/report.dcm", "problem": "Is there an effusion?", "normal_caption": "no"}]
    path = _write(tmp_path / "vqa.json", rows)
    out = tmp_path / "run"
    with pytest.raises(BadDataError) as e:
        check_datasets(_acc(out), _args(out), train=VQADataset(path, files["root"], tok, ip, model.config,
                                                               collect_bad_rows=True))
    msg = str(e.value)
    assert f"{path} row 3: missing or empty ['problem']" in msg and f"{path} row 4: missing or empty ['problem']" in msg
    assert f"{path} row 5: missing or empty ['normal_caption']" in msg and f"{path} row 6: " in msg
    assert "no pixel data" in msg and msg.startswith("4 bad rows")
    ds = VQADataset(path, files["root"], tok, ip, model.config, collect_bad_rows=True)
    assert len(check_datasets(_acc(out), _args(out, "skip"), train=ds)) == 4 and len(ds) == 3
    assert [ds[k]["index"] for k in range(3)] == [0, 1, 2]


def test_ct_volumes_by_csv_headers_and_full_decode(files, parts, tmp_path):
    img = files["root"] / "images"
    table = tmp_path / "ct.csv"
    with table.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["img_path", "findings", "split"])
        for name in ("vol.npz", "flat.npz", "wrong_key.npz", "nan.npz", "missing.npz", "vol3d.npz"):
            w.writerow([img / name, f"findings of {name}", "train"])
    out = tmp_path / "run"

    def check(full):
        ds = ImageTextContrastiveDataset(table, "", VolumeProcessor(size=(4, 8, 8)), parts[1], 16,
                                         split_column="split", split="train", collect_bad_rows=True)
        with pytest.raises(BadDataError) as e:
            check_datasets(_acc(out), _args(out, full=full), train=ds)
        return str(e.value)

    headers = check(False)
    assert f"{table} line 3: " in headers and "expected (C, D, H, W)" in headers
    assert f"{table} line 4: " in headers and "no 'image' array" in headers
    assert f"{table} line 6: " in headers and "no such file" in headers
    assert "line 5:" not in headers and "line 2:" not in headers and "line 7:" not in headers
    full = check(True)
    assert f"{table} line 5: " in full and "NaN" in full and full.startswith("4 bad rows")


# ---------------------------------------------------------------- end to end

def _breaking_check(monkeypatch, victim: Path):
    """check_datasets as the entry points call it, then `victim` is overwritten: a file that
    turns unreadable after the check (a sync job rewrote it, a disk went bad)."""
    original = data_check.check_datasets

    def check_then_break(*a, **kw):
        bad = original(*a, **kw)
        victim.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
        return bad
    monkeypatch.setattr(data_check, "check_datasets", check_then_break)


def _stage0_argv(model, out, train, val, root, *extra):
    return ["--model_name", str(model), "--train_json", str(train), "--val_json", str(val), "--image_root", str(root),
            "--output_dir", str(out), "--batch_size", "4", "--num_workers", "0", "--report_to", "none",
            "--num_epochs", "1", "--learning_rate", "1e-3", "--warmup_steps", "1", "--logging_steps", "1",
            "--no-save_epoch_models", *extra]


def test_stage0_training_stops_before_step_one_or_skips_and_survives_a_file_broken_mid_run(
        files, tiny_siglip, tmp_path, monkeypatch, capfd):
    from Stage0.train_vision_encoder_stage0 import main
    good = [{"image": r["image"], "caption": r["caption"]} for r in files["stage0"][10:26]]
    victim = tmp_path / "victim.png"
    shutil.copy(files["root"] / good[5]["image"], victim)
    good[5]["image"] = str(victim)  # an absolute path: this test's own copy is the one that breaks
    train = _write(tmp_path / "train.json", good[:6] + [{"image": "images/truncated.png", "caption": "x"}]
                   + good[6:12] + [{"image": "images/absent.png", "caption": "y"}])
    val = _write(tmp_path / "val.json", good[12:] + [{"image": "images/notes.png", "caption": "z"}])

    with pytest.raises(BadDataError) as e:
        main(_stage0_argv(tiny_siglip, tmp_path / "err", train, val, files["root"]))
    assert all(f"{f} row {i}: " in str(e.value) for f, i in ((train, 6), (train, 13), (val, 4)))
    assert not (tmp_path / "err" / "final_model").exists() and not (tmp_path / "err" / "checkpoints").exists()
    assert not (tmp_path / "err" / "metrics.jsonl").exists()  # not one step, not even the step-0 validation

    _breaking_check(monkeypatch, victim)
    out = tmp_path / "skip"
    capfd.readouterr()
    trainer = main(_stage0_argv(tiny_siglip, out, train, val, files["root"], "--on_bad_sample", "skip"))
    log = capfd.readouterr().err
    assert (out / "final_model" / "model.safetensors").exists()
    assert len(trainer.train_dataset) == 12 and len(trainer.val_dataset) == 4
    dropped = json.loads((out / "dropped_rows.json").read_text())
    assert {(r["file"], r["row"]) for r in dropped["rows"]} == {(str(train), 6), (str(train), 13), (str(val), 4)}
    assert [json.loads(line)["data/dropped_rows"] for line in (out / "metrics.jsonl").read_text().splitlines()
            if "data/dropped_rows" in line] == [3]
    subs = [json.loads(line) for line in (out / "substituted_rows.jsonl").read_text().splitlines()]
    # Dataset index 5 (file row 5) broke; the next row of the dataset (file row 7, after the dropped 6) stands in.
    assert subs and {(s["file"], s["row"], s["replaced_by"]) for s in subs} == {(str(train), 5, 7)}
    warned = [ln for ln in log.splitlines() if "victim.png" in ln]
    assert len(warned) == 1 and "Using the sample of row 7 in its place" in warned[0], log

    # --on_bad_sample error: the run stops at the broken row, after checkpointing the last finished
    # step; with the file fixed, a resume ends on the weights of a run that never met it.
    readable = files["root"] / files["stage0"][15]["image"]
    shutil.copy(readable, victim)  # readable again for the check
    clean, val = _write(tmp_path / "clean.json", good[:12]), _write(tmp_path / "v.json", good[12:])
    err_mid = tmp_path / "err_mid"
    with pytest.raises(ImageLoadError, match=r"victim\.png.*row 5 of .*clean\.json") as e:
        main(_stage0_argv(tiny_siglip, err_mid, clean, val, files["root"], "--on_bad_sample", "error",
                          "--num_epochs", "2", "--seed", "3"))
    from training.checkpoints import list_checkpoints
    saved = list_checkpoints(err_mid)
    assert not (err_mid / "final_model").exists() and saved, str(e.value)
    step = int(saved[-1].name[5:])
    assert step > 0 and f"A resume checkpoint of step {step} was written" in str(e.value)
    assert "--resume_from_checkpoint latest" in str(e.value)
    shutil.copy(readable, victim)
    monkeypatch.undo()
    main(_stage0_argv(tiny_siglip, err_mid, clean, val, files["root"], "--num_epochs", "2", "--seed", "3",
                      "--resume_from_checkpoint", "latest"))
    main(_stage0_argv(tiny_siglip, tmp_path / "never_broken", clean, val, files["root"], "--num_epochs", "2",
                      "--seed", "3"))
    _same_safetensors(err_mid / "final_model" / "model.safetensors",
                      tmp_path / "never_broken" / "final_model" / "model.safetensors")


BREAK_AFTER_CHECK = """
import data_check
_check = data_check.check_datasets
def _check_then_break(*a, **kw):
    bad = _check(*a, **kw)
    open({victim!r}, "wb").write(b"\\x89PNG\\r\\n\\x1a\\n" + b"\\x00" * 40)
    return bad
data_check.check_datasets = _check_then_break
"""


@pytest.mark.slow
def test_two_processes_stop_together_at_a_row_broken_mid_run_and_keep_the_finished_steps(files, tiny_siglip, tmp_path):
    """One process meets the broken row; without agreeing first, the other would wait at the next
    gradient all-reduce until the collective timeout. Both stop after the same step, and the
    checkpoint of that step is written."""
    from conftest import accelerate_two_processes

    from training.checkpoints import list_checkpoints
    good = [{"image": r["image"], "caption": r["caption"]} for r in files["stage0"][10:26]]
    victim = tmp_path / "victim.png"
    shutil.copy(files["root"] / good[5]["image"], victim)
    good[5]["image"] = str(victim)
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(BREAK_AFTER_CHECK.format(victim=str(victim)))
    out = tmp_path / "run"
    argv = _stage0_argv(tiny_siglip, out, _write(tmp_path / "train.json", good),
                        _write(tmp_path / "val.json", good[12:]), files["root"], "--batch_size", "2",
                        "--num_epochs", "2", "--seed", "2")
    proc = accelerate_two_processes("Stage0/train_vision_encoder_stage0.py", argv, timeout=300,
                                    site=tmp_path / "site")
    assert proc.returncode != 0 and "victim.png" in proc.stdout, proc.stdout[-3000:]
    assert "every process stopped after the same step" in proc.stdout, proc.stdout[-3000:]
    saved = list_checkpoints(out)
    assert saved and not (out / "final_model").exists(), proc.stdout[-3000:]
    assert f"resume checkpoint of step {saved[-1].name[5:]} was written" in proc.stdout


def test_stage2_training_error_then_skip(files, tiny_siglip, gemma, tmp_path, monkeypatch):
    from Stage2.train_vqa_stage2 import main
    good = [{k: r[k] for k in ("image", "problem", "normal_caption")} for r in files["stage2"][:12]]
    victim = tmp_path / "victim.png"
    shutil.copy(files["root"] / good[2]["image"], victim)
    good[2]["image"] = str(victim)
    train = _write(tmp_path / "train.json", good[:8] + [{**good[0], "normal_caption": " "},
                                                        {**good[1], "image": "images/cut.dcm"}])
    val = _write(tmp_path / "val.json", good[8:])

    def argv(out, *extra):
        return ["--image_root", str(files["root"]), "--train_json", str(train), "--val_json", str(val),
                "--output_dir", str(out), "--vision_model_name", str(tiny_siglip), "--llm_name", str(gemma),
                "--batch_size", "4", "--num_epochs", "1", "--num_workers", "0", "--report_to", "none",
                "--max_a_len", "16", "--warmup_steps", "1", "--logging_steps", "1", "--no-save_every_epoch", *extra]

    with pytest.raises(BadDataError) as e:
        main(argv(tmp_path / "err"))
    assert f"{train} row 8: missing or empty ['normal_caption']" in str(e.value)
    assert f"{train} row 9: " in str(e.value) and "cut.dcm" in str(e.value)
    assert not (tmp_path / "err" / "final_model").exists() and not (tmp_path / "err" / "checkpoints").exists()

    _breaking_check(monkeypatch, victim)
    out = tmp_path / "skip"
    main(argv(out, "--on_bad_sample", "skip"))
    assert (out / "final_model" / "config.json").exists()
    dropped = json.loads((out / "dropped_rows.json").read_text())
    assert dropped["count"] == 2 and {r["row"] for r in dropped["rows"]} == {8, 9}
    subs = [json.loads(line) for line in (out / "substituted_rows.jsonl").read_text().splitlines()]
    assert {(s["row"], s["replaced_by"]) for s in subs} == {(2, 3)}


# ---------------------------------------------------------------- scripts/data/validate_data.py

def _validate(capsys, *argv):
    rc = validate_main([str(a) for a in argv])
    return rc, capsys.readouterr().out


def test_validate_data_script_for_every_stage(files, tmp_path, capsys):
    root = files["root"]
    s0 = [{"image": r["image"], "caption": r["caption"]} for r in files["stage0"][:4]]
    s2 = [{k: r[k] for k in ("image", "problem", "normal_caption")} for r in files["stage2"][:4]]
    cases = {  # name: (good rows, bad rows appended, stage flag, keys in the summary)
        "stage0.json": (s0, [{"image": "images/truncated.png", "caption": "x"}, {"image": s0[0]["image"]}], "0",
                        "Stage0"),
        "stage1.json": (s0, [{"image": "images/absent.png", "caption": "x"}, {**s0[1], "caption": ""}], "auto",
                        "Stage0/1"),
        "stage2.json": (s2, [{**s2[0], "problem": ""}, {**s2[1], "image": "images/report.dcm"}], "auto", "Stage2"),
    }
    for name, (good, bad, stage, label) in cases.items():
        ok = _write(tmp_path / f"ok_{name}", good)
        rc, out = _validate(capsys, "--data", ok, "--image_root", root, "--stage", stage)
        assert rc == 0 and out.strip() == out.strip().splitlines()[-1] and "4 rows" in out and "all valid" in out
        assert f"{label} keys" in out
        broken = _write(tmp_path / f"bad_{name}", good + bad)
        rc, out = _validate(capsys, "--data", broken, "--image_root", root, "--stage", stage)
        lines = out.strip().splitlines()
        assert rc == 1 and len(lines) == 3, out
        assert lines[0].startswith(f"{broken} row 4: ") and lines[1].startswith(f"{broken} row 5: ")
        assert "6 rows" in lines[2] and "2 with problems" in lines[2] and "--on_bad_sample skip" in lines[2]

    table = tmp_path / "knee.csv"  # Stage0 CSV (knee layout): paths relative to the CSV's folder
    rows = [[f"images/demo_0000{i}.png", f"impression {i}"] for i in range(3)]
    with table.open("w", newline="") as f:
        csv.writer(f).writerows([["img_path", "impression"], *rows, ["images/notes.png", "x"],
                                 ["images/demo_00005.png", ""]])
    shutil.copytree(root / "images", tmp_path / "images", dirs_exist_ok=True)
    rc, out = _validate(capsys, "--data", table)
    assert rc == 1 and f"{table} line 5: " in out and "not a recognised image format" in out
    assert f"{table} line 6: empty impression" in out and "line 2:" not in out and "5 rows" in out

    ct = tmp_path / "ct.csv"
    with ct.open("w", newline="") as f:
        csv.writer(f).writerows([["img_path", "findings"], [root / "images" / "vol.npz", "a"],
                                 [root / "images" / "nan.npz", "b"]])
    assert _validate(capsys, "--data", ct)[0] == 0  # headers only: NaN needs the values
    rc, out = _validate(capsys, "--data", ct, "--full_decode")
    assert rc == 1 and f"{ct} line 3: " in out and "NaN" in out

    (tmp_path / "broken.json").write_text("[{")
    rc, out = _validate(capsys, "--data", tmp_path / "broken.json", "--stage", "2")
    assert rc == 1 and "not valid JSON" in out
    (tmp_path / "other.json").write_text(json.dumps([{"image": "a.png", "text": "x"}]))
    with pytest.raises(cli.UserError, match=r"cannot tell the stage .*--stage"):
        validate_main(["--data", str(tmp_path / "other.json")])

    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "data" / "validate_data.py"), "--help"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and "--full_decode" in run.stdout and "--stage" in run.stdout
