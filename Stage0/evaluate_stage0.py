"""Evaluate one or more SigLIP checkpoints on a test JSON: SigLIP loss, image<->text R@1/R@5
and, given a findings file, per-finding zero-shot ROC AUC from the prompt pair
"<finding>" vs "no <finding>" (score = sim(image, positive) - sim(image, negative)).

    python Stage0/evaluate_stage0.py --model_path runs/stage0/final_model \\
        --test_json data/demo/stage0_test.json --image_root data/demo \\
        --findings_json data/demo/findings.json --output_json runs/stage0/test_metrics.json

Every row is checked before a model loads: a bad one (missing or unreadable image, empty text)
stops the run with every bad row listed, or with --on_bad_sample skip is left out (logged, and
counted as `skipped_rows` in the results). An existing --output_json is replaced only with --force.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cli
import preflight


def parse_args(argv=None):
    p = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_path", nargs="+", required=True, help="one or more Stage0 model folders")
    p.add_argument("--labels", nargs="+", default=None, help="column names for the table")
    p.add_argument("--reinit_vision_tower", nargs="*", default=[],
                   help="labels of models to evaluate with a random vision tower (a fine-tune's start)")
    p.add_argument("--test_json", "--csv_file", dest="test_json", required=True,
                   help="a JSON or CSV data file (with --label_column: labelled rows, class retrieval metrics)")
    p.add_argument("--label_column", default=None,
                   help="class labels per row (';'-separated): evaluate top-1 class retrieval over all classes")
    p.add_argument("--classes_file", default=None,
                   help="condition,description,icd10: the class prompts' texts (default: the classes the model "
                        "was trained on, from its class_prompts.json)")
    p.add_argument("--class_prompt_template", default=None,
                   help="{condition}/{description} wording of the class prompts (default: the one the model was "
                        "trained with, from its class_prompts.json; else the seed's); a different one is warned about")
    p.add_argument("--unknown_labels", choices=["warn", "error"], default="warn",
                   help="labels missing from the classes: warn and score them as classes of their own, or refuse")
    p.add_argument("--split", default=None, help="only the rows whose 'split' column is this")
    p.add_argument("--image_key", "--img_path_column", dest="image_key", default=None)
    p.add_argument("--image_root", default="")
    p.add_argument("--findings_json", default=None,
                   help='list of {"name", "positive_prompt", "negative_prompt"}; rows need "labels"')
    p.add_argument("--batch_size", type=cli.positive_int, default=64)
    p.add_argument("--device", default=None, help="default: cuda when a GPU is visible, else cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output_json", default=None)
    p.add_argument("--force", action="store_true", help="replace an existing --output_json (and its .md table)")
    p.add_argument("--on_bad_sample", choices=["error", "skip"], default="error",
                   help="rows whose image is missing or unreadable, or whose text is empty: error lists them all "
                        "and stops before a model loads; skip evaluates without them (counted as skipped_rows)")
    args = p.parse_args(argv)
    args.device = cli.check_device(p, args.device)
    preflight.check_output_file(args.output_json, "--output_json", args.force)
    if args.output_json and args.label_column:
        preflight.check_output_file(Path(args.output_json).with_suffix(".md"), "--output_json", args.force)
    if args.class_prompt_template is not None:
        from Stage0.labels import check_template
        try:
            check_template(args.class_prompt_template)
        except ValueError as e:
            p.error(str(e))
    return args


if __name__ == "__main__" and cli.help_requested():
    parse_args()  # the help, without waiting seconds for the imports below

import torch

from data_check import check_rows
from metrics import auc
from Stage0.dataset import ImageTextContrastiveDataset, collate_fn, data_keys
from Stage0.towers import load_model, text_length
from Stage0.train_vision_encoder_stage0 import reinit_image_backbone
from Stage0.trainer import DualEncoder, evaluate_contrastive

logger = logging.getLogger("siglip_med")


@torch.no_grad()
def zero_shot_auc(encoder, dataset, findings, tokenizer, max_len, batch_size, device,
                  curves: dict | None = None) -> dict[str, float]:
    """Per finding, the AUC of (positive prompt - negative prompt) similarity; `curves` gets
    each finding's ROC curve (false and true positive rates, AUC) for the picture."""
    prompts = [f[k] for f in findings for k in ("positive_prompt", "negative_prompt")]
    ids, mask = encoder.model.text.tokenize(tokenizer, prompts, max_len)
    _, txt, _, _ = encoder(input_ids=ids.to(device), attention_mask=mask.to(device))
    imgs = []
    for s in range(0, len(dataset), batch_size):
        b = collate_fn([dataset[i] for i in range(s, min(s + batch_size, len(dataset)))])
        imgs.append(encoder(pixel_values=b["pixel_values"].to(device))[0].float())
    sim = torch.cat(imgs) @ txt.float().T
    out = {}
    for j, f in enumerate(findings):
        labels = [int(r.get("labels", {}).get(f["name"], 0)) for r in dataset.rows]
        margin = (sim[:, 2 * j] - sim[:, 2 * j + 1]).cpu().numpy()
        out[f"AUC {f['name']}"] = auc(margin, labels)
        if curves is not None and len(set(labels)) == 2:
            from sklearn.metrics import roc_curve
            fpr, tpr, _ = roc_curve(labels, margin)
            curves[f["name"]] = (fpr.tolist(), tpr.tolist(), out[f"AUC {f['name']}"])
    vals = [v for v in out.values() if v == v]
    out["AUC mean"] = sum(vals) / len(vals) if vals else float("nan")
    return out


def evaluate_model(path, args, findings, reinit=False, skip=(), curves: dict | None = None) -> dict[str, float]:
    """`skip`: the rows (`row` ids) left out under --on_bad_sample skip; `curves`: filled with
    each finding's ROC curve."""
    torch.manual_seed(args.seed)
    model, tokenizer, image_processor = load_model(path)
    if reinit:
        reinit_image_backbone(model)
    model.to(args.device).eval()
    max_len = text_length(model.text, tokenizer, None)
    ds = ImageTextContrastiveDataset(args.test_json, args.image_root, image_processor, tokenizer, max_len,
                                     tokenize=lambda texts, n: model.text.tokenize(tokenizer, texts, n),
                                     collect_bad_rows=bool(skip))
    if skip:
        ds.drop_rows([k for k, r in enumerate(ds.rows) if r["row"] in set(skip)])
    encoder = DualEncoder(model)
    out = evaluate_contrastive(encoder, ds, args.batch_size, args.device)
    if findings:
        out.update(zero_shot_auc(encoder, ds, findings, tokenizer, max_len, args.batch_size, args.device, curves))
    if skip:
        out["skipped_rows"] = len(skip)
    return out


@torch.no_grad()
def evaluate_classes(path, args, rows=None, plot_path=None) -> dict:
    """Labelled data (seed 004): each image against every class prompt (one matrix product of
    image embeddings, computed once, by the class text embeddings); top-1 accuracy, macro
    precision/recall/F1, R@1/R@5 over all classes, the 1-in-10 distractor test, per-class table.
    For a multi-label row, a predicted class among its labels is correct. Tied scores (sigmoid
    probabilities saturated at 1.0, a collapsed model) count by expected rank, never as a win."""
    from torch.utils.data import DataLoader

    from data_rows import read_rows
    from metrics import class_recall_at_k, distractor_top1, top1_classification
    from Stage0.inference_stage0 import ImageFiles, score
    from Stage0.labels import (PROMPTS_FILE, check_unknown_labels, class_texts, parse_labels, read_classes,
                               resolve_prompts)
    image_key = args.image_key or ("img_path" if str(args.test_json).lower().endswith(".csv") else "image")
    if rows is None:  # main passes the rows it checked (--on_bad_sample)
        rows = read_rows(args.test_json, args.image_root, (image_key,), image_key=image_key,
                         split_column="split" if args.split else None, split=args.split)
    rows = [r for r in rows if parse_labels(r.get(args.label_column))]
    classes = read_classes(args.classes_file) if args.classes_file else {}
    template, classes = resolve_prompts(path, getattr(args, "class_prompt_template", None), classes)
    label_sets = [parse_labels(r[args.label_column]) for r in rows]
    source = args.classes_file or (Path(path) / PROMPTS_FILE if classes else None)
    check_unknown_labels(label_sets, classes, source, getattr(args, "unknown_labels", "warn"))
    names = sorted(set(classes) | {c for s in label_sets for c in s})
    prompts = class_texts(names, classes, template)
    index = {c: k for k, c in enumerate(names)}
    model, tokenizer, processor = load_model(path)
    model.to(args.device).eval()
    loader = DataLoader(ImageFiles(rows, processor, args.test_json, image_root=args.image_root, image_key=image_key),
                        batch_size=args.batch_size)
    scores = score(model, tokenizer, loader, prompts, args.device)
    true_sets = [{index[c] for c in s} for s in label_sets]
    out = top1_classification(scores, [[index[c] for c in s] for s in label_sets], names)
    out.update(class_recall_at_k(scores, true_sets, ks=(1, 5)))
    out["distractor_top1"] = distractor_top1(scores, [index[s[0]] for s in label_sets], n_distractors=9,
                                             seed=args.seed)
    out["n_images"], out["n_classes"] = len(rows), len(names)
    out["class_prompt_template"], out["class_prompts"] = template, dict(zip(names, prompts))
    if plot_path:  # true class (a row's first label) x top-1 predicted class
        from plots import confusion
        counts = torch.zeros(len(names), len(names), dtype=torch.long)
        for s, pred in zip(label_sets, scores.argmax(dim=1).tolist()):
            counts[index[s[0]], pred] += 1
        out["plots"] = [str(confusion(counts.numpy(), names, plot_path))]
    return out


def class_table(m: dict) -> str:
    lines = ["| metric | value | chance |", "|---|---|---|",
             f"| accuracy (top-1 class) | {m['accuracy']:.4f} | majority class share |",
             f"| macro precision / recall / F1 | {m['macro_precision']:.4f} / {m['macro_recall']:.4f} / "
             f"{m['macro_f1']:.4f} | ~1/K |",
             f"| R@1 / R@5 over {m['n_classes']} classes | {m['R@1']:.4f} / {m['R@5']:.4f} | "
             f"{1 / m['n_classes']:.3f} / {min(5 / m['n_classes'], 1):.3f} |",
             f"| 1 correct among {min(9, m['n_classes'] - 1)} random distractors | {m['distractor_top1']:.4f} | "
             f"{1 / min(10, m['n_classes']):.3f} |",
             "", "| class | support | recall | F1 |", "|---|---|---|---|"]
    lines += [f"| {c} | {v['support']} | {v['recall']:.3f} | {v['f1']:.3f} |" for c, v in m["per_class"].items()]
    return "\n".join(lines)


def format_table(results: dict[str, dict[str, float]]) -> str:
    names = list(results)
    keys = list(dict.fromkeys(k for r in results.values() for k in r))
    width = max(len(k) for k in keys) + 2
    lines = ["| " + "metric".ljust(width) + " | " + " | ".join(n.rjust(12) for n in names) + " |",
             "|" + "-" * (width + 2) + "|" + "|".join("-" * 14 for _ in names) + "|"]
    for k in keys:
        lines.append("| " + k.ljust(width) + " | " + " | ".join(f"{results[n].get(k, float('nan')):12.4f}"
                                                                 for n in names) + " |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", stream=sys.stderr)
    labels = args.labels or [Path(p).name for p in args.model_path]
    if len(labels) != len(args.model_path):
        raise SystemExit("--labels needs one name per --model_path")
    # Every input before the first model loads: the folders' kind, the data file, each row's image.
    for path in args.model_path:
        preflight.require_checkpoint(path, "--model_path", {"stage0"}, "a Stage0 model",
                                     "pass Stage0 output folders such as runs/stage0/final_model")
    split = args.split if args.label_column else None  # evaluate_model reads every row
    preflight.check_data_file(args.test_json, "--test_json", split_column="split" if split else None, split=split)
    image_key, caption_key = data_keys(args.test_json, args.image_key if args.label_column else None)
    keys = (image_key,) if args.label_column else (image_key, caption_key)
    rows, bad = check_rows(args.test_json, args.image_root, keys, image_key=image_key,
                           on_bad_sample=args.on_bad_sample, split_column="split" if split else None, split=split)
    if args.label_column:
        if len(args.model_path) != 1:
            raise SystemExit("--label_column evaluates one --model_path")
        plot = Path(args.output_json).with_name(Path(args.output_json).stem + "_confusion.png") \
            if args.output_json else None
        m = evaluate_classes(args.model_path[0], args, rows=rows, plot_path=plot)
        if bad:
            m["skipped_rows"] = len(bad)
        table = class_table(m)
        print(table)
        if args.output_json:
            Path(args.output_json).write_text(json.dumps(m, indent=2))
            Path(args.output_json).with_suffix(".md").write_text(table + "\n")
        return m
    findings = json.loads(Path(args.findings_json).read_text()) if args.findings_json else None
    curves = {lab: {} for lab in labels}
    results = {lab: evaluate_model(p, args, findings, reinit=lab in args.reinit_vision_tower,
                                   skip={b.row for b in bad}, curves=curves[lab])
               for lab, p in zip(labels, args.model_path)}
    print(format_table(results))
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(results, indent=2))
        from plots import roc_curves
        out = Path(args.output_json)
        for lab in labels:
            if curves[lab]:
                path = roc_curves(curves[lab], out.with_name(f"{out.stem}_roc_{Path(lab).name}.png"),
                                  title=f"zero-shot ROC: {lab}")
                logger.info("wrote %s", path)
    return results


if __name__ == "__main__":
    cli.run(main)
