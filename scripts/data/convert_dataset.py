"""Convert a public release, as downloaded, into the stages' formats, with the split papers
report on.

    python scripts/data/convert_dataset.py vqa_rad --input ~/data/VQA_RAD --out_dir data/vqa_rad
    python scripts/data/convert_dataset.py slake --input ~/data/Slake1.0 --out_dir data/slake
    python scripts/data/convert_dataset.py mimic_cxr --input ~/data/mimic-cxr-jpg/2.0.0 \
        --reports ~/data/mimic-cxr-reports --out_dir data/mimic
    python scripts/data/convert_dataset.py chexpert --input ~/data/CheXpert-v1.0-small --out_dir data/chexpert \
        --five_by_200 chexpert_5x200.csv

Formats:
  vqa_rad  `VQA_RAD Dataset Public.json` and `VQA_RAD Image Folder/` (the OSF release). The usual
           split: test = the rows whose phrase_type starts with "test" (451 in the public
           release), train = the rest (3,064). OUT/vqa_rad_{train,test}.json.
  slake    `train.json`, `validate.json`, `test.json` and `imgs/` (SLAKE 1.0): the English
           questions (q_lang "en"). OUT/slake_{train,val,test}.json.

  mimic_cxr  MIMIC-CXR-JPG (`files/`, `mimic-cxr-2.0.0-split.csv.gz`, `-metadata.csv.gz`,
           `-chexpert.csv.gz`) with MIMIC-CXR's reports (--reports: the folder holding
           `files/pNN/pSUBJECT/sSTUDY.txt`). Frontal images only (ViewPosition PA or AP), the
           release's split (validate -> val): OUT/mimic_cxr_{split}.json for Stage0/Stage1 (image,
           caption = the report's --section, labels = the 14 CheXpert labels, 1 positive and 0,
           blank or -1 negative, or -1 positive with --uncertain positive) and
           OUT/mimic_cxr_report_{split}.json for Stage2 ("Describe the findings." -> FINDINGS),
           plus OUT/chexpert_findings.json (the labels' prompts, for --findings_json).
  chexpert  `train.csv` and `valid.csv` (CheXpert-v1.0 or -small; `Path` is relative to the
           folder above the release): OUT/chexpert.csv, a labelled CSV of the frontal images
           (img_path, labels: the positive labels ';'-separated, -1 as --uncertain says, split
           train/val) for Stage0's labelled evaluation. With --five_by_200 (the CheXpert 5x200
           list of ConVIRT and GLoRIA: a CSV of `Path` and the five classes, one positive per
           row) also OUT/chexpert_5x200.csv and OUT/chexpert_5x200_classes.csv: the zero-shot
           protocol, top-1 accuracy over the five class prompts (Stage0/evaluate_stage0.py
           --label_column labels --classes_file OUT/chexpert_5x200_classes.csv).

Each VQA row keeps the release's answer_type (CLOSED/OPEN) as question_type closed/open, which
Stage2/evaluate.py scores by (closed accuracy, open recall), and its id (`qid`) and organ or
modality. Image paths are relative to the image folder, which is printed as the --image_root to
train and evaluate with. A summary gives the rows per split and every skipped row's reason
(a question or answer that is empty, an image the folder lacks); a folder that is not the
format's is refused in one line naming what is missing.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from pathlib import Path

if __package__ in (None, ""):  # `python scripts/data/convert_dataset.py` from anywhere
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import cli
import preflight
from data_rows import DataFileError, load_table


def _load_list(path: Path, what: str) -> list:
    try:
        data, _ = load_table(path)
    except DataFileError as e:
        raise cli.UserError(f"{e}; is it the release's {what}?") from e
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

    def summary(self, written: dict[str, Path], rows: dict[str, list] | None = None) -> str:
        """`rows`: what each written file holds, when not one split each (CheXpert's tables)."""
        rows = rows if rows is not None else self.splits
        lines = []
        for split, path in written.items():
            types = Counter(r["question_type"] for r in rows[split] if "question_type" in r)
            kinds = f" ({', '.join(f'{n} {t}' for t, n in sorted(types.items()))})" if types else ""
            lines.append(f"{split:>14}: {len(rows[split]):>6} rows{kinds} -> {path}")
        lines += [f"left out {n} rows: {why}" for why, n in self.left_out.items()]
        if self.skipped:
            reasons = Counter(re.sub(r" ('[^']*'|s\d+\.txt|under \S+|in \S+)", "", reason)
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


CHEXPERT_LABELS = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum",
                   "Fracture", "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion", "Pleural Other",
                   "Pneumonia", "Pneumothorax", "Support Devices")
REPORT_QUESTION = "Describe the findings."
_SECTION = re.compile(r"^[ \t]*([A-Z][A-Z /&()-]{2,}):", re.M)


def report_sections(text: str) -> dict[str, str]:
    """A radiology report's sections by their upper-case header ("FINDINGS:", "IMPRESSION:"),
    each whitespace-collapsed; text before the first header is left out."""
    heads = list(_SECTION.finditer(text))
    out = {}
    for m, nxt in zip(heads, heads[1:] + [None]):
        body = _text(text[m.end(): nxt.start() if nxt else len(text)])
        if body:
            out[m.group(1).strip()] = body
    return out


def _csv_gz(path: Path) -> list[dict]:
    import csv
    import gzip
    try:
        with gzip.open(path, "rt", newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise cli.UserError(f"{path}: not a readable gzipped CSV ({e})") from e


def convert_mimic_cxr(folder: Path, reports: Path | None, section: str = "findings",
                      uncertain: str = "negative") -> Converted:
    names = ["files", "mimic-cxr-2.0.0-split.csv.gz", "mimic-cxr-2.0.0-metadata.csv.gz",
             "mimic-cxr-2.0.0-chexpert.csv.gz"]
    _require(folder, "MIMIC-CXR-JPG", names)
    if reports is None or not reports.is_dir():
        raise cli.UserError(f"--reports {reports}: the MIMIC-CXR reports folder (holding files/pNN/pSUBJECT/"
                            "sSTUDY.txt) is needed for the captions; pass it")
    report_root = reports / "files" if (reports / "files").is_dir() else reports
    views = {r["dicom_id"]: r.get("ViewPosition", "") for r in _csv_gz(folder / names[2])}
    labels = {r["study_id"]: r for r in _csv_gz(folder / names[3])}
    positive = {"1.0", "1"} | ({"-1.0", "-1"} if uncertain == "positive" else set())
    out = Converted(folder)
    texts: dict[str, dict] = {}
    for r in _csv_gz(folder / names[1]):
        split = {"validate": "val"}.get(r["split"], r["split"])
        view = views.get(r["dicom_id"], "")
        if view not in ("PA", "AP"):
            out.left_out[f"not frontal (ViewPosition {view or 'blank'})"] += 1
            continue
        subject, study = r["subject_id"], r["study_id"]
        rel = f"files/p{subject[:2]}/p{subject}/s{study}"
        image = f"{rel}/{r['dicom_id']}.jpg"
        if study not in texts:
            path = report_root / f"p{subject[:2]}/p{subject}/s{study}.txt"
            texts[study] = report_sections(path.read_text(errors="replace")) if path.is_file() else None
        sections = texts[study]
        if sections is None:
            out.skipped.append((split, r["dicom_id"], f"no report s{study}.txt under {report_root}"))
            continue
        findings, impression = sections.get("FINDINGS", ""), sections.get("IMPRESSION", "")
        caption = {"findings": findings, "impression": impression,
                   "both": " ".join(t for t in (findings, impression) if t)}[section]
        if not caption:
            out.skipped.append((split, r["dicom_id"], f"no {section.upper()} section in its report"
                                if section != "both" else "no FINDINGS or IMPRESSION section in its report"))
            continue
        if not (folder / image).is_file():
            out.skipped.append((split, r["dicom_id"], f"no image {image!r} in {folder}"))
            continue
        row_labels = {name: int(str((labels.get(study) or {}).get(name, "")).strip() in positive)
                      for name in CHEXPERT_LABELS}
        out.splits.setdefault(split, []).append({"image": image, "caption": caption, "labels": row_labels,
                                                 "study_id": study, "view": view})
        if findings:
            out.splits.setdefault(f"report_{split}", []).append(
                {"image": image, "problem": REPORT_QUESTION, "normal_caption": findings, "question_type": "report",
                 "study_id": study})
    return out


def chexpert_findings() -> list[dict]:
    """The 14 labels as findings.json entries, the prompts Stage0's zero-shot AUC contrasts."""
    return [{"name": n, "positive_prompt": n.lower(), "negative_prompt": f"no {n.lower()}"}
            for n in CHEXPERT_LABELS if n != "No Finding"]


FIVE_BY_200 = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")


def _csv(path: Path) -> tuple[list[dict], list[str]]:
    rows, columns = load_table(path)
    if columns is None:
        raise cli.UserError(f"{path}: expected a CSV file (a .csv with a header)")
    return rows, columns


def convert_chexpert(folder: Path, uncertain: str = "negative", five_by_200: Path | None = None) -> Converted:
    _require(folder, "CheXpert", ["train.csv", "valid.csv"])
    out = Converted(folder.parent)  # `Path` starts with the release folder's own name
    positive = {"1.0", "1"} | ({"-1.0", "-1"} if uncertain == "positive" else set())
    for split, name in (("train", "train.csv"), ("val", "valid.csv")):
        rows, columns = _csv(folder / name)
        missing = [c for c in ("Path", *FIVE_BY_200) if c not in columns]
        if missing:
            raise cli.UserError(f"{folder / name}: no column {missing} (columns: {columns[:8]}...); is it CheXpert's?")
        for r in rows:
            if str(r.get("Frontal/Lateral", "Frontal")).strip() != "Frontal":
                out.left_out[f"not frontal ({r.get('Frontal/Lateral')})"] += 1
                continue
            image = r["Path"].strip()
            if not (out.image_root / image).is_file():
                out.skipped.append((split, image, f"no image in {out.image_root}"))
                continue
            labels = [c for c in CHEXPERT_LABELS if str(r.get(c, "")).strip() in positive]
            out.splits.setdefault(split, []).append({"img_path": image, "labels": ";".join(labels), "split": split})
    if five_by_200 is not None:
        rows, columns = _csv(five_by_200)
        missing = [c for c in ("Path", *FIVE_BY_200) if c not in columns]
        if missing:
            raise cli.UserError(f"--five_by_200 {five_by_200}: no column {missing}; expected Path and the five "
                                f"classes {list(FIVE_BY_200)}, one positive per row")
        for i, r in enumerate(rows):
            hits = [c for c in FIVE_BY_200 if str(r.get(c, "")).strip() in ("1", "1.0")]
            image = r["Path"].strip()
            if len(hits) != 1:
                out.skipped.append(("5x200", f"row {i + 2}", f"{len(hits)} of the five classes positive, not one"))
            elif not (out.image_root / image).is_file():
                out.skipped.append(("5x200", image, f"no image in {out.image_root}"))
            else:
                out.splits.setdefault("5x200", []).append({"img_path": image, "labels": hits[0], "split": "test"})
    return out


def write_tables(converted: Converted, out_dir: Path) -> tuple[dict[str, Path], dict[str, list]]:
    """CheXpert's outputs are CSVs (Stage0's labelled layout): one for the train and val
    splits, one for the 5x200 list, and its classes file; (written files, their rows)."""
    import csv
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    tables = {"chexpert": [r for s in ("train", "val") for r in converted.splits.get(s, [])],
              "chexpert_5x200": converted.splits.get("5x200", [])}
    for name, rows in tables.items():
        if rows:
            path = out_dir / f"{name}.csv"
            with path.open("w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=["img_path", "labels", "split"])
                w.writeheader()
                w.writerows(rows)
            written[name] = path
    if "chexpert_5x200" in written:
        path = out_dir / "chexpert_5x200_classes.csv"
        with path.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["condition", "description", "icd10"])
            w.writerows([(c, c.lower(), "") for c in FIVE_BY_200])
        written["classes"] = path
        tables["classes"] = list(FIVE_BY_200)
    return written, tables


FORMATS = {"vqa_rad": convert_vqa_rad, "slake": convert_slake, "mimic_cxr": convert_mimic_cxr,
           "chexpert": convert_chexpert}


def parse_args(argv=None):
    p = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("format", choices=sorted(FORMATS), help="the release's format")
    p.add_argument("--input", required=True, type=Path, help="the release folder as downloaded and unpacked")
    p.add_argument("--out_dir", required=True, type=Path, help="where the converted files go")
    p.add_argument("--force", action="store_true", help="replace files of the same names in --out_dir")
    g = p.add_argument_group("mimic_cxr")
    g.add_argument("--reports", type=Path, default=None, help="MIMIC-CXR's reports folder (files/pNN/pSUBJECT/"
                   "sSTUDY.txt)")
    g.add_argument("--section", choices=["findings", "impression", "both"], default="findings",
                   help="the report section that becomes the Stage0/Stage1 caption")
    g.add_argument("--uncertain", choices=["negative", "positive"], default="negative",
                   help="mimic_cxr, chexpert: what a CheXpert label of -1 (uncertain) counts as")
    g.add_argument("--five_by_200", type=Path, default=None,
                   help="chexpert: the CheXpert 5x200 list (Path and the five classes) for the zero-shot protocol")
    return p.parse_args(argv)


def main(argv=None) -> dict[str, Path]:
    args = parse_args(argv)
    args.input, args.out_dir = args.input.expanduser(), args.out_dir.expanduser()
    if not args.input.is_dir():
        raise FileNotFoundError(f"--input {args.input}: no such folder; pass the unpacked release's folder")
    extra = ({"reports": args.reports and args.reports.expanduser(), "section": args.section,
              "uncertain": args.uncertain} if args.format == "mimic_cxr" else
             {"uncertain": args.uncertain, "five_by_200": args.five_by_200} if args.format == "chexpert" else {})
    converted = FORMATS[args.format](args.input, **extra)
    if not converted.splits:
        raise cli.UserError(f"--input {args.input}: no usable {args.format} rows "
                            f"({len(converted.skipped)} skipped, e.g. {converted.skipped[:1]})")
    targets = ([args.out_dir / f"{n}.csv" for n in ("chexpert", "chexpert_5x200", "chexpert_5x200_classes")]
               if args.format == "chexpert" else [args.out_dir / f"{args.format}_{s}.json" for s in converted.splits]
               + ([args.out_dir / "chexpert_findings.json"] if args.format == "mimic_cxr" else []))
    for path in targets:
        preflight.check_output_file(path, "--out_dir", args.force)
    if args.format == "chexpert":
        written, shown = write_tables(converted, args.out_dir)
    else:
        written, shown = converted.write(args.out_dir, args.format), None
    if args.format == "mimic_cxr":
        findings = args.out_dir / "chexpert_findings.json"
        findings.write_text(json.dumps(chexpert_findings(), indent=1))
    print(converted.summary(written, shown))
    return written


if __name__ == "__main__":
    cli.run(main)
