"""CSV tools of the chest-CT seed (002): validate a data CSV, list a folder of NPZ volumes as a
CSV, and turn the legacy directory mode into a CSV."""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import cli
import preflight
from data_check import DataFileError, validate_file
from Stage0.dataset import data_keys


def validate_csv(path, image_root="", image_key=None, caption_key=None, split_column=None, out=None) -> int:
    """Check every row: the columns, that each file exists and reads (an NPZ's 'image' is
    (C, D, H, W) and finite), and that each text is non-empty. Prints `line N: reason` for every
    problem (the header is line 1) and returns 0 when clean, 1 otherwise. The checks are
    data_check.validate_file's (what training checks), with every volume read in full."""
    out = out or sys.stdout  # looked up per call: a default bound at import misses later redirection
    path = Path(path)
    if not path.is_file():
        print(f"{path}: no such file", file=out)
        return 1
    image_key, caption_key = data_keys(path, image_key, caption_key)
    try:
        n, bad = validate_file(path, image_root, (image_key, caption_key), image_key=image_key, full=True,
                               required_columns=[c for c in (image_key, caption_key, split_column) if c])
    except DataFileError as e:
        print(f"line 1: {e.reason}", file=out)
        return 1
    for b in bad:
        print(f"{b.row}: {b.reason}", file=out)
    print(f"{path}: {n} rows, {len(bad)} with problems" if bad else f"{path}: {n} rows, all valid", file=out)
    return 1 if bad else 0


def create_example_csv(npz_directory, out_path=None, text="No findings text available.", force=False) -> Path:
    """A CSV (img_path, findings, split) for the volumes in a folder: absolute paths, a
    placeholder text to replace, and a deterministic 80/10/10 split by file name. An existing
    file is replaced only with `force`: it is usually the data CSV, its reports written by hand."""
    folder = Path(npz_directory)
    files = sorted(folder.glob("*.npz"))
    if not files:
        raise SystemExit(f"error: no .npz files in {folder}")
    out = Path(out_path) if out_path else folder / "example.csv"
    if out.is_file() and not force:
        raise cli.UserError(f"--csv_file {out}: the file exists, and --create_example_csv would replace every "
                            f"text in it with {text!r}; pass another --csv_file, or --force to replace it")
    preflight.check_output_file(out, "--csv_file", force)
    with out.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["img_path", "findings", "split"])
        for i, p in enumerate(files):
            w.writerow([str(p.resolve()), text, "val" if i % 10 == 8 else "test" if i % 10 == 9 else "train"])
    return out


def csv_from_directories(train_dir, val_dir=None, reports_path=None, out_path="data_from_dirs.csv") -> Path:
    """The CT seed's legacy directory mode as a CSV: every NPZ of train_dir (and val_dir), its text
    from the reports JSON by file stem (a placeholder where a report is missing)."""
    reports = json.loads(Path(reports_path).read_text()) if reports_path else {}
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["img_path", "findings", "split"])
        for split, folder in (("train", train_dir), ("val", val_dir)):
            if folder:
                for p in sorted(Path(folder).glob("*.npz")):
                    w.writerow([str(p.resolve()), reports.get(p.stem, "No report text available."), split])
    return out
