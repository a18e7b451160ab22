"""The data tools on bad input: every bad row listed in the project's `FILE row N: reason` form
while the good rows are still processed; the image cache's refresh hint runs as printed;
validate_data.py on a JSON that is not a list and on labels missing from a classes file; model
names checked before anything loads."""
import csv
import json
import logging
import os
import subprocess
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

import cli
import image_cache
import preflight
from data_rows import read_rows
from image_cache import open_cache

ROOT = Path(__file__).resolve().parents[1]


def _images(folder: Path, n: int = 3) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        paths.append(folder / f"im{i}.png")
        Image.fromarray((rng.random((30 + i, 40)) * 255).astype(np.uint8)).save(paths[-1])
    (folder / "notes.png").write_text("not an image")
    return paths


# ---------------------------------------------------------------- scripts/data/preprocess_images.py

@pytest.mark.parametrize("kind", ["json", "csv"])
def test_preprocess_lists_every_bad_row_and_caches_the_good_ones(kind, tmp_path, capsys, monkeypatch):
    from scripts.data.preprocess_images import main
    monkeypatch.delenv(image_cache.ENV_VAR, raising=False)
    _images(tmp_path / "images", 2)
    names = ["im0.png", "absent.png", "im1.png", "notes.png", ""]
    data = tmp_path / f"train.{kind}"
    if kind == "json":
        data.write_text(json.dumps([{"image": n, "caption": "x"} for n in names]))
        at = [f"{data} row {i}: " for i in (1, 3, 4)]
    else:
        with data.open("w", newline="") as f:
            csv.writer(f).writerows([["img_path", "impression"], *[[n, "x"] for n in names]])
        at = [f"{data} line {i}: " for i in (3, 5, 6)]
    rc = main(["--data", str(data), "--image_root", str(tmp_path / "images"), "--size", "8", "8",
               "--num_workers", "0"])
    captured = capsys.readouterr()
    assert rc == 1, captured.err
    assert "usage:" not in captured.err and "Traceback" not in captured.err
    listed = [ln for ln in captured.err.splitlines() if ln.startswith(str(data))]
    assert len(listed) == 3 and all(any(ln.startswith(a) for ln in listed) for a in at), captured.err
    assert "absent.png" in captured.err and "not a recognised image format" in captured.err
    index = json.loads((tmp_path / ".image_cache" / "8x8-bicubic" / "index.json").read_text())
    assert sorted(index["entries"]) == ["../../images/im0.png", "../../images/im1.png"]


# ---------------------------------------------------------------- the image cache's refresh hint

def _hint(open_it) -> str:
    """The refresh command open_cache logs (its own handler: the script replaced the root's)."""
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("siglip_med")
    logger.addHandler(handler)
    try:
        open_it()
    finally:
        logger.removeHandler(handler)
    (msg,) = [r.getMessage() for r in records if "Refresh with: " in r.getMessage()]
    return msg.split("Refresh with: ", 1)[1]


@pytest.mark.parametrize("layout", ["json-size", "csv-column-shortest-edge"])
def test_stale_cache_hint_is_a_command_that_works_as_printed(layout, tmp_path, monkeypatch):
    from scripts.data.preprocess_images import main as preprocess
    monkeypatch.delenv(image_cache.ENV_VAR, raising=False)
    images = _images(tmp_path / "images")
    (tmp_path / "data").mkdir()
    if layout == "json-size":
        data, key = tmp_path / "data" / "train.json", "image"
        data.write_text(json.dumps([{"image": p.name, "caption": "x"} for p in images]))
        proc = SimpleNamespace(size={"height": 16, "width": 12}, do_resize=True, resample=3)
        target = ["--size", "16", "12"]
    else:  # another image column, a shortest-edge processor
        data, key = tmp_path / "data" / "knee.csv", "path"
        with data.open("w", newline="") as f:
            csv.writer(f).writerows([["path", "impression"], *[[p.name, "x"] for p in images]])
        proc = SimpleNamespace(size={"shortest_edge": 10}, do_resize=True, resample=2)
        target = ["--shortest_edge", "10", "--resample", "bilinear"]
    root = str(tmp_path / "images")
    assert preprocess(["--data", str(data), "--image_root", root, "--image_key", key, *target,
                       "--num_workers", "0"]) == 0
    Image.fromarray(np.zeros((50, 50), np.uint8)).save(images[1])  # a source changes: its entry is stale
    rows = read_rows(data, root, (key,), image_key=key)
    command = _hint(lambda: open_cache(data, proc, rows, image_root=root, image_key=key))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # Pasted into a shell where the project's environment is not active (a bare `python` there
    # lacks the requirements): the command names the interpreter that has them.
    env = {**os.environ, "PATH": "/usr/bin:/bin"}
    run = subprocess.run(["bash", "-c", command], cwd=elsewhere, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, (command, run.stderr[-2000:])
    cache = open_cache(data, proc, rows, image_root=root, image_key=key)
    assert cache.status([r["image_path"] for r in rows]) == {"fresh": 3, "stale": 0, "missing": 0}


# ---------------------------------------------------------------- scripts/data/validate_data.py

def test_validate_data_says_a_json_that_is_not_a_list_in_one_line(tmp_path, capsys):
    from scripts.data.validate_data import main as validate
    for text, holds in (('{"image": "a.png", "caption": "x"}', "a JSON dict"), ('"a.png"', "a JSON str")):
        data = tmp_path / "rows.json"
        data.write_text(text)
        for stage in ("auto", "0", "2"):
            assert validate(["--data", str(data), "--stage", stage]) == 1
            out = capsys.readouterr().out.strip().splitlines()
            assert len(out) == 1 and "not a JSON list of rows" in out[0] and holds in out[0], out


def test_validate_data_names_an_empty_list_and_rows_that_are_not_objects(tmp_path, capsys):
    from scripts.data.validate_data import main as validate
    for text, words in (("[]", "no rows"), ("[1, 2, 3]", "3 of 3 rows are not JSON objects (the first is a int)")):
        (tmp_path / "d.json").write_text(text)
        with pytest.raises(SystemExit) as e:
            cli.run(validate, ["--data", str(tmp_path / "d.json")])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == cli.EXIT_USER_ERROR and len(err) == 1 and words in err[0], err


def test_validate_data_checks_labels_against_the_classes_file(tmp_path, capsys):
    from scripts.data.validate_data import main as validate
    _images(tmp_path / "images", 3)
    classes = tmp_path / "classes.csv"
    classes.write_text("condition,description,icd10\neczema,itchy,L30.9\npsoriasis,plaques,L40.0\n")
    data = tmp_path / "derm.csv"
    with data.open("w", newline="") as f:
        csv.writer(f).writerows([["img_path", "labels"], ["images/im0.png", "eczema"],
                                 ["images/im1.png", "psoriasis;wart"], ["images/im2.png", "tinea; verruca"]])
    assert validate(["--data", str(data), "--classes_file", str(classes)]) == 1
    out = capsys.readouterr().out.strip().splitlines()
    assert out[0] == f"{data} line 3: label 'wart' not in --classes_file {classes}"
    assert out[1] == f"{data} line 4: labels 'tinea', 'verruca' not in --classes_file {classes}"
    assert "3 rows" in out[2] and "2 with labels not in" in out[2] and len(out) == 3
    # --on_bad_sample skip keeps such rows (their labels become classes): the advice is the flag that refuses them
    assert "--unknown_labels error" in out[2] and "--on_bad_sample skip" not in out[2]
    classes.write_text(classes.read_text() + "wart,,\ntinea,,\nverruca,,\n")
    assert validate(["--data", str(data), "--classes_file", str(classes), "--label_column", "labels"]) == 0
    assert "all valid; every label is in" in capsys.readouterr().out
    stage1 = tmp_path / "s1.json"
    stage1.write_text(json.dumps([{"image": str(tmp_path / "images" / "im0.png"), "caption": "x"}]))
    with pytest.raises(cli.UserError, match="--classes_file .*--label_column"):
        validate(["--data", str(stage1), "--classes_file", str(classes)])


# ---------------------------------------------------------------- files the tools write

def test_create_example_csv_replaces_only_with_force(tmp_path):
    from Stage0.data_tools import create_example_csv
    (tmp_path / "vols").mkdir()
    np.savez(tmp_path / "vols" / "a.npz", image=np.zeros((1, 2, 4, 4), np.float32))
    mine = tmp_path / "data.csv"
    mine.write_text("img_path,findings,split\nvols/a.npz,my report,train\n")
    with pytest.raises(cli.UserError, match=r"data\.csv: the file exists.*--force"):
        create_example_csv(tmp_path / "vols", mine)
    assert "my report" in mine.read_text()
    create_example_csv(tmp_path / "vols", mine, force=True)
    assert "No findings text available." in mine.read_text()


def test_demo_data_rewrites_its_own_folder_but_not_a_users(tmp_path):
    from scripts.demo.make_demo_data import main as make_demo
    args = ["--num_images", "4", "--image_size", "32", "--num_workers", "1"]
    make_demo(["--out_dir", str(tmp_path / "demo"), *args])
    make_demo(["--out_dir", str(tmp_path / "demo"), *args])  # an earlier demo is rewritten in place
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "stage0_train.json").write_text("[]")
    with pytest.raises(SystemExit, match="--force"):
        make_demo(["--out_dir", str(tmp_path / "mine"), *args])
    assert (tmp_path / "mine" / "stage0_train.json").read_text() == "[]"
    make_demo(["--out_dir", str(tmp_path / "mine"), *args, "--force"])
    assert (tmp_path / "mine" / "stage0_train.json").read_text() != "[]"


# ---------------------------------------------------------------- models by folder or hub id

def test_require_model_takes_folders_and_cached_hub_ids_offline(tmp_path, monkeypatch):
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    (tmp_path / "hub" / "models--org--cached" / "snapshots" / "abc").mkdir(parents=True)
    preflight.require_model("org/cached", "--model_name")
    preflight.require_model(str(tmp_path), "--model_name")
    with pytest.raises(cli.UserError, match="org/absent: no such folder here, and as a hub id"):
        preflight.require_model("org/absent", "--model_name")
    with pytest.raises(FileNotFoundError, match="no such folder"):
        preflight.require_model(str(tmp_path / "runs" / "final_model"), "--model_name")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    preflight.require_model("org/absent", "--model_name")  # online: the hub answers for itself
