"""Convert a public VQA release, as downloaded, into Stage2's JSON (image, problem, normal_caption,
question_type), with the split papers report on.

    python scripts/data/convert_dataset.py vqa_rad --input ~/data/VQA_RAD --out_dir data/vqa_rad
    python scripts/data/convert_dataset.py slake --input ~/data/Slake1.0 --out_dir data/slake

Formats:
  vqa_rad  `VQA_RAD Dataset Public.json` and `VQA_RAD Image Folder/` (the OSF release). The usual
           split: test = the rows whose phrase_type starts with "test" (451 in the public
           release), train = the rest (3,064). OUT/vqa_rad_{train,test}.json.
  slake    `train.json`, `validate.json`, `test.json` and `imgs/` (SLAKE 1.0): the English
           questions (q_lang "en"). OUT/slake_{train,val,test}.json.

Each row keeps the release's answer_type (CLOSED/OPEN) as question_type closed/open, which
Stage2/evaluate.py scores by (closed accuracy, open recall), and its id (`qid`) and organ or
modality. Image paths are relative to the image folder, which is printed as the --image_root to
train and evaluate with. A summary gives the rows per split and every skipped row's reason
(a question or answer that is empty, an image the folder lacks); a folder that is not the
format's is refused in one line naming what is missing.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

if __package__ in (None, ""):  # `python scripts/data/convert_dataset.py` from anywhere
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import cli
import preflight


def _load_list(path: Path, what: str) -> list:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise cli.UserError(f"{path}: not readable as JSON ({e}); is it the release's {what}?") from e
    if not isinstance(data, list):
        raise cli.UserError(f"{path}: expected a JSON list of questions, got a JSON {type(data).__name__}")
    return data


def _require(folder: Path, fmt: str, names: list[str]) -> None:
    missing = [n for n in names if not (folder / n).exists()]
    if missing:
        raise cli.UserError(f"--input {folder}: not a {fmt} release: no {', '.join(repr(m) for m in missing)} "
                            f"there; pass the folder that holds {', '.join(repr(n) for n in names)}")


def _text(value) -> str:
    return "" if value is None else " ".join(str(value).split())


class Converted:
    """Rows per split, and the skipped rows with their reasons."""

    def __init__(self, image_root: Path):
        self.image_root = image_root
        self.splits: dict[str, list[dict]] = {}
        self.skipped: list[tuple[str, str, str]] = []  # (split, id, reason)
        self.left_out: Counter = Counter()  # rows outside the protocol (another language), by why

    def add(self, split: str, item_id, image: str, question, answer, answer_type, **extra) -> None:
        q, a = _text(question), _text(answer)
        reason = ("an empty question" if not q else "an empty answer" if not a
                  else f"no image {image!r} in {self.image_root}" if not (self.image_root / image).is_file() else None)
        if reason:
            self.skipped.append((split, str(item_id), reason))
            return
        kind = _text(answer_type).lower()
        row = {"image": image, "problem": q, "normal_caption": a, "qid": item_id, **extra}
        if kind in ("closed", "open"):
            row["question_type"] = kind
        self.splits.setdefault(split, []).append(row)

    def write(self, out_dir: Path, prefix: str) -> dict[str, Path]:
        out_dir.mkdir(parents=True, exist_ok=True)
        written = {}
        for split, rows in self.splits.items():
            path = out_dir / f"{prefix}_{split}.json"
            path.write_text(json.dumps(rows, indent=1, ensure_ascii=False))
            written[split] = path
        return written

    def summary(self, written: dict[str, Path]) -> str:
        lines = []
        for split, path in written.items():
            types = Counter(r.get("question_type", "-") for r in self.splits[split])
            kinds = ", ".join(f"{n} {t}" for t, n in sorted(types.items()))
            lines.append(f"{split:>6}: {len(self.splits[split]):>6} rows ({kinds}) -> {path}")
        lines += [f"left out {n} rows: {why}" for why, n in self.left_out.items()]
        if self.skipped:
            reasons = Counter(reason.split(" '")[0] if reason.startswith("no image") else reason
                              for _, _, reason in self.skipped)
            lines.append(f"skipped {len(self.skipped)} rows: " + "; ".join(f"{n} with {r}" for r, n in reasons.items()))
            lines += [f"  {split} {item}: {reason}" for split, item, reason in self.skipped[:20]]
            if len(self.skipped) > 20:
                lines.append(f"  ... and {len(self.skipped) - 20} more")
        lines.append(f"image root: --image_root {self.image_root}")
        return "\n".join(lines)


def convert_vqa_rad(folder: Path) -> Converted:
    data_file, images = "VQA_RAD Dataset Public.json", "VQA_RAD Image Folder"
    _require(folder, "VQA-RAD", [data_file, images])
    out = Converted(folder / images)
    for i, q in enumerate(_load_list(folder / data_file, data_file)):
        if not isinstance(q, dict):
            out.skipped.append(("?", f"item {i}", "not a JSON object"))
            continue
        split = "test" if str(q.get("phrase_type", "")).lower().startswith("test") else "train"
        out.add(split, q.get("qid", f"item {i}"), _text(q.get("image_name")), q.get("question"), q.get("answer"),
                q.get("answer_type"), organ=q.get("image_organ"))
    return out


def convert_slake(folder: Path) -> Converted:
    files = {"train": "train.json", "val": "validate.json", "test": "test.json"}
    _require(folder, "SLAKE", [*files.values(), "imgs"])
    out = Converted(folder / "imgs")
    for split, name in files.items():
        for i, q in enumerate(_load_list(folder / name, name)):
            if isinstance(q, dict) and q.get("q_lang", "en") != "en":
                out.left_out[f"not English (q_lang {q.get('q_lang')!r})"] += 1  # SLAKE's Chinese half
                continue
            if not isinstance(q, dict):
                out.skipped.append((split, f"item {i}", "not a JSON object"))
                continue
            out.add(split, q.get("qid", f"item {i}"), _text(q.get("img_name")), q.get("question"), q.get("answer"),
                    q.get("answer_type"), modality=q.get("modality"), location=q.get("location"))
    return out


FORMATS = {"vqa_rad": convert_vqa_rad, "slake": convert_slake}


def parse_args(argv=None):
    p = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("format", choices=sorted(FORMATS), help="the release's format")
    p.add_argument("--input", required=True, type=Path, help="the release folder as downloaded and unpacked")
    p.add_argument("--out_dir", required=True, type=Path, help="where the Stage2 JSON files go")
    p.add_argument("--force", action="store_true", help="replace JSON files of the same names in --out_dir")
    return p.parse_args(argv)


def main(argv=None) -> dict[str, Path]:
    args = parse_args(argv)
    if not args.input.is_dir():
        raise FileNotFoundError(f"--input {args.input}: no such folder; pass the unpacked release's folder")
    converted = FORMATS[args.format](args.input.expanduser())
    if not converted.splits:
        raise cli.UserError(f"--input {args.input}: no usable {args.format} rows "
                            f"({len(converted.skipped)} skipped, e.g. {converted.skipped[:1]})")
    for split in converted.splits:
        preflight.check_output_file(args.out_dir / f"{args.format}_{split}.json", "--out_dir", args.force)
    written = converted.write(args.out_dir, args.format)
    print(converted.summary(written))
    return written


if __name__ == "__main__":
    cli.run(main)
