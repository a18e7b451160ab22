"""Check a data file of any stage before training: every row's keys and texts, and that its image
or volume opens, with the checks training runs before its first step (data_check.py).

    python scripts/validate_data.py --data data/demo/stage2_train.json --image_root data/demo
    python scripts/validate_data.py --data knee.csv --full_decode

Prints one `FILE row N: reason` per bad row (a CSV's rows as `FILE line N`, the header being
line 1), then a summary line; exits 0 when every row is usable, 1 otherwise (a file that is not
valid JSON/CSV or lacks a column counts as one problem), 2 for a bad command line.

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

if __package__ in (None, ""):  # `python scripts/validate_data.py` from anywhere
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cli


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
    keys = set().union(*(r for r in rows if isinstance(r, dict))) if isinstance(rows, list) else set()
    if keys & {QUESTION_KEY, ANSWER_KEY}:
        return "2"
    if "caption" in keys:
        return "1"
    raise cli.UserError(f"--data {path}: cannot tell the stage from the rows' keys {sorted(keys)} (Stage0/1: image, "
                        f"caption; Stage2: image, {QUESTION_KEY}, {ANSWER_KEY}); pass --stage, or --image_key and "
                        "--caption_key with --stage 0")


def stage_keys(stage: str, args) -> tuple[tuple[str, ...], str]:
    """(keys every row needs, the image key) as that stage's dataset reads the file."""
    if stage == "2":
        from Stage2.dataset import ANSWER_KEY, QUESTION_KEY
        return ("image", QUESTION_KEY, ANSWER_KEY), "image"
    if stage == "1":
        return ("image", "caption"), "image"
    from image_loader import csv_columns
    from Stage0.dataset import data_keys
    image_key, caption_key = data_keys(args.data, args.image_key, args.caption_key)
    label_column = args.label_column
    header = csv_columns(args.data) if str(args.data).lower().endswith(".csv") else []
    if not label_column and not args.caption_key and caption_key not in header and "labels" in header:
        label_column = "labels"  # the labelled recipe's CSV (seed 004): labels instead of a text
    if label_column:
        return (image_key, label_column), image_key
    return (image_key, caption_key), image_key


def main(argv=None) -> int:
    args = parse_args(argv)
    from data_check import DataFileError, validate_file
    stage = infer_stage(args.data) if args.stage == "auto" else args.stage
    keys, image_key = stage_keys(stage, args)
    how = "full decode" if args.full_decode else "headers"
    try:
        n, bad = validate_file(args.data, args.image_root, keys, image_key=image_key, full=args.full_decode)
    except (DataFileError, FileNotFoundError) as e:
        print(e)
        print(f"{args.data}: unusable as a whole (stage {stage} keys {list(keys)})")
        return 1
    for b in bad:
        print(b)
    label = "Stage0/1" if stage == "1" and args.stage == "auto" else f"Stage{stage}"
    summary = f"{args.data}: {n} rows ({label} keys {list(keys)}, {how} checked), "
    print(summary + (f"{len(bad)} with problems; fix or remove them, or train with --on_bad_sample skip to drop them"
                     if bad else "all valid"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
