"""Check a data file of any stage before training: every row's keys and texts, and that its image
or volume opens, with the checks training runs before its first step (data_check.py).

    python scripts/data/validate_data.py --data data/demo/stage2_train.json --image_root data/demo
    python scripts/data/validate_data.py --data knee.csv --full_decode

Prints one `FILE row N: reason` per bad row (a CSV's rows as `FILE line N`, the header being
line 1), then a summary line; exits 0 when every row is usable, 1 otherwise (a file that is not
valid JSON/CSV, is not a JSON list of rows, or lacks a column is one problem, reported in one
line), 2 for a bad command line.

Labelled data (seed 004): with --classes_file (the condition,description,icd10 CSV training gets)
every row's labels (--label_column, `;`-separated; default `labels`) are also checked against the
classes in it: a label missing from the file is reported on its row (training would make it a
class of its own, with no description).

The stage sets the keys each row needs (`--stage auto` reads them off the file):
  0  Stage0: JSON image + caption, or a CSV with img_path + impression (or findings); other
     names with --image_key / --caption_key; labelled data (seed 004): a `labels` column, or
     another named with --label_column
  1  Stage1: JSON image + caption (the same layout as Stage0's JSON)
  2  Stage2: JSON image + problem (question) + normal_caption (answer)
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # `python scripts/data/validate_data.py` from anywhere
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import cli
import preflight


def parse_args(argv=None):
    p = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="the data file: a JSON list of objects or a CSV with a header")
    p.add_argument("--image_root", default="",
                   help="folder that relative image paths are under, as the training flag of that name (default: "
                        "the working folder for JSON, the CSV's folder for a CSV)")
    p.add_argument("--stage", choices=["0", "1", "2", "auto"], default="auto",
                   help="whose layout to check (default auto: CSV -> 0, JSON with problem/normal_caption -> 2, "
                        "JSON with caption -> 1, which is also Stage0's JSON layout)")
    p.add_argument("--full_decode", action="store_true",
                   help="decode every image and read every volume (finds e.g. NaN in a CT volume); default: "
                        "headers only, as training checks without --full_decode_check")
    p.add_argument("--image_key", "--img_path_column", dest="image_key", default=None,
                   help="Stage0: the image column (default: image for JSON, img_path for CSV)")
    p.add_argument("--caption_key", "--findings_column", "--impression_column", dest="caption_key", default=None,
                   help="Stage0: the text column (default: caption for JSON, impression or findings for CSV)")
    p.add_argument("--label_column", default=None,
                   help="Stage0 labelled data (seed 004): the label column, needed instead of a text column")
    p.add_argument("--classes_file", default=None,
                   help="labelled data: the classes CSV (condition,description,icd10); each row's labels must be "
                        "among its conditions")
    return p.parse_args(argv)


def infer_stage(path) -> str:
    """'0' for a CSV; for a JSON list, from the keys its rows hold."""
    if str(path).lower().endswith(".csv"):
        return "0"
    from Stage2.dataset import ANSWER_KEY, QUESTION_KEY
    try:
        rows = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "1"  # reading the rows reports why the file is unusable
    if not isinstance(rows, list):
        return "1"  # not a list of rows: main says so
    if not rows:
        raise cli.UserError(f"--data {path}: no rows (an empty JSON list); nothing to check")
    others = [type(r).__name__ for r in rows if not isinstance(r, dict)]
    if others:
        raise cli.UserError(f"--data {path}: {len(others)} of {len(rows)} rows are not JSON objects (the first is a "
                            f"{others[0]}); a data file is a JSON list of objects, one per row, e.g. "
                            '[{"image": "a.png", "caption": "..."}]')
    keys = set().union(*(r for r in rows if isinstance(r, dict)))
    if keys & {QUESTION_KEY, ANSWER_KEY}:
        return "2"
    if "caption" in keys:
        return "1"
    raise cli.UserError(f"--data {path}: cannot tell the stage from the rows' keys {sorted(keys)} (Stage0/1: image, "
                        f"caption; Stage2: image, {QUESTION_KEY}, {ANSWER_KEY}); pass --stage, or --image_key and "
                        "--caption_key with --stage 0")


def stage_keys(stage: str, args) -> tuple[tuple[str, ...], str, str | None]:
    """(keys every row needs, the image key, the label column of labelled data or None) as that
    stage's dataset reads the file."""
    if stage == "2":
        from Stage2.dataset import ANSWER_KEY, QUESTION_KEY
        return ("image", QUESTION_KEY, ANSWER_KEY), "image", None
    if stage == "1":
        return ("image", "caption"), "image", None
    from data_rows import csv_columns
    from Stage0.dataset import data_keys
    image_key, caption_key = data_keys(args.data, args.image_key, args.caption_key)
    label_column = args.label_column
    header = csv_columns(args.data) if str(args.data).lower().endswith(".csv") else []
    if not label_column and not args.caption_key and caption_key not in header and "labels" in header:
        label_column = "labels"  # the labelled recipe's CSV (seed 004): labels instead of a text
    if label_column:
        return (image_key, label_column), image_key, label_column
    return (image_key, caption_key), image_key, None


def not_a_list(path) -> str | None:
    """What a JSON data file holds instead of a list of rows, or None (a list, a CSV, or a file
    that is not JSON at all, which reading the rows reports)."""
    if str(path).lower().endswith(".csv"):
        return None
    try:
        rows = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if isinstance(rows, list):
        return None
    return f"a JSON {type(rows).__name__}" + (f" with keys {sorted(rows)[:6]}" if isinstance(rows, dict) else "")


def label_problems(rows, path, label_column: str, classes_file) -> list:
    """A BadRow per row with labels missing from the classes file."""
    from data_check import BadRow
    from Stage0.labels import parse_labels, read_classes
    classes = read_classes(classes_file)
    out = []
    for r in rows:
        unknown = [c for c in parse_labels(r.get(label_column)) if c not in classes]
        if unknown:
            out.append(BadRow(str(path), r["row"], f"label{'s' if len(unknown) > 1 else ''} "
                                                    f"{', '.join(map(repr, unknown))} not in --classes_file "
                                                    f"{classes_file}"))
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    from data_check import DataFileError, check_file, merge
    holds = not_a_list(args.data)
    if holds:
        print(f"{args.data}: not a JSON list of rows (it holds {holds}); a data file is a JSON list of objects, "
              "one per row, or a CSV with a header")
        return 1
    stage = infer_stage(args.data) if args.stage == "auto" else args.stage
    keys, image_key, label_column = stage_keys(stage, args)
    if args.classes_file:
        preflight.require_file(args.classes_file, "--classes_file", "classes CSV")
        if not label_column:
            raise cli.UserError(f"--classes_file {args.classes_file}: checks labelled Stage0 data; name the column "
                                "holding each row's labels with --label_column (a CSV's 'labels' column is found "
                                "without it)")
    how = "full decode" if args.full_decode else "headers"
    try:
        rows, bad = check_file(args.data, args.image_root, keys, image_key=image_key, full=args.full_decode)
    except (DataFileError, FileNotFoundError) as e:
        print(f"{e} (unusable as a whole; stage {stage} keys {list(keys)})")
        return 1
    n = len(rows) + len(bad)
    unlisted = []
    if args.classes_file:
        unlisted = label_problems(rows, args.data, label_column, args.classes_file)
        bad = merge(bad + unlisted)
    for b in bad:
        print(b)
    label = "Stage0/1" if stage == "1" and args.stage == "auto" else f"Stage{stage}"
    summary = f"{args.data}: {n} rows ({label} keys {list(keys)}, {how} checked), "
    if not bad:
        print(summary + "all valid" + (f"; every label is in {args.classes_file}" if args.classes_file else ""))
        return 0
    fix = ["fix or remove them, or train with --on_bad_sample skip to drop them"] if len(bad) > len(unlisted) else []
    if unlisted:  # --on_bad_sample skip keeps these rows: an unknown label trains as a class of its own
        fix.insert(0, f"{len(unlisted)} with labels not in {args.classes_file} (add those classes to it, or fix the "
                      "labels; training warns about them, and refuses them with --unknown_labels error)")
    print(summary + f"{len(bad)} with problems; " + "; ".join(fix))
    return 1


if __name__ == "__main__":
    sys.exit(cli.run(main))
