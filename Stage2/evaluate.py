"""Evaluate a Stage 2 model on a VQA JSON with batched generation.

    python Stage2/evaluate.py --model_path runs/stage2/final_model --image_root data/demo \\
        --test_json data/demo/stage2_test.json --output_json runs/stage2/eval_test.json

    python Stage2/evaluate.py --predictions_json published_run.json --test_json vqa_rad_test.json

Per question type (the rows' `question_type`, any case: VQA-RAD's and SLAKE's answer_type
CLOSED/OPEN included; without one, a yes/no reference is "closed" and anything else "open"):
  closed    accuracy. A yes/no reference is matched by the prediction's verdict, its first whole
            word "yes" or "no" (metrics.yes_no): "Not sure." is no verdict, so wrong for "no",
            where a substring test (LLaVA-Med's scorer) finds "no" in it and counts it right.
            Any other closed reference ("left", "CT") must equal the prediction after
            normalisation: "right" is wrong for "left". `answered` is the share of yes/no
            predictions that hold a verdict at all. The majority-answer baseline (always the
            most common reference verdict) is reported beside it, because a model that learned
            only the answer prior already scores that much.
  location  exact match after normalisation (metrics.normalize_answer), plus token F1.
  open      recall, the share of the reference's words found in the prediction (LLaVA-Med's
            open-question metric, on whole words), and token F1 (metrics.token_f1).
  report    report generation (question_type "report", as convert_dataset.py writes MIMIC-CXR's):
            corpus BLEU-1 and BLEU-4, ROUGE-L, and METEOR where NLTK's WordNet data is installed
            (metrics.report_metrics); BERTScore (bert-score) when its model is at hand
            (--bertscore_model); CheXbert F1, micro and macro over the 14 labels and the five
            findings, with --chexbert_path; RadGraph F1 (the radgraph package's F1RadGraph) with
            --radgraph_path, at the reward level --radgraph_reward_level names ("all": simple,
            partial and complete, i.e. RG_E, RG_ER, RG_bar_ER) (clinical_metrics). Each names the
            library, version and settings that computed it.
--predictions_json scores saved predictions without a model: a JSON list with one item per
test row in order (a string, or an object with a `prediction` key), or this script's own
OUTPUT_JSON, whose predictions carry their rows; it gives the summary the model run gave.
The table goes to standard output, OUTPUT_JSON gets the summary and every prediction, and
OUTPUT_JSON with a .md suffix the same table in Markdown; existing ones are replaced only with
--force.

Every row is checked before the model loads, as training checks it: a bad one (missing or
unreadable image, empty question or answer) stops the run with every bad row listed
(--on_bad_sample error, the default), or with --on_bad_sample skip is left out, logged, and listed
in OUTPUT_JSON's summary as `skipped` (file, row, reason).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from collections import Counter, defaultdict
from dataclasses import asdict
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cli
import preflight


def parse_args(argv=None):
    p = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model (--model_path, or --llm_path + --projector_path, or --predictions_json)")
    g.add_argument("--model_path", default=None, help="an exported Stage 2 folder, e.g. runs/stage2/final_model, or a "
                   "Gemma 3 multimodal checkpoint (folder or hub id, e.g. google/medgemma-4b-it: the zero-shot baseline)")
    g.add_argument("--llm_path", default=None)
    g.add_argument("--projector_path", default=None)
    g.add_argument("--vision_model_name", default=None)
    g.add_argument("--predictions_json", default=None,
                   help="score these saved predictions instead of running a model (see above)")
    g = p.add_argument_group("data")
    g.add_argument("--test_json", required=True, help="Stage 2 format, optionally with question_type/finding")
    g.add_argument("--image_root", default=None, help="required with a model (the images are read)")
    g.add_argument("--output_json", default=None,
                   help="summary + predictions (default: MODEL/eval_<test json name>.json); a .md table beside it")
    g.add_argument("--force", action="store_true", help="replace an existing OUTPUT_JSON (and its .md table)")
    g.add_argument("--on_bad_sample", choices=["error", "skip"], default="error",
                   help="rows whose image is missing or unreadable, or whose question or answer is empty: error "
                        "lists them all and stops before the model loads; skip evaluates without them")
    g.add_argument("--limit", type=int, default=None, help="evaluate the first N rows only")
    g.add_argument("--max_q_len", type=int, default=None, help="truncate questions as in training")
    g = p.add_argument_group("report generation metrics (rows of question_type report)")
    g.add_argument("--bertscore_model", default=None, metavar="NAME_OR_PATH",
                   help="BERTScore's model, a hub id or a local folder; default: bert-score's for English "
                        "(roberta-large) when it is in the Hugging Face cache, else BERTScore is reported "
                        "unavailable; 'none' skips BERTScore")
    g.add_argument("--bertscore_num_layers", type=cli.positive_int, default=None,
                   help="the layer whose embeddings are compared (default: bert-score's tuned layer for the "
                        "model, else its last)")
    g.add_argument("--bertscore_idf", action="store_true", help="idf weights from the references")
    g.add_argument("--bertscore_rescale_with_baseline", action="store_true",
                   help="rescale with bert-score's baseline for the model (it has them for hub models such as "
                        "roberta-large, distilbert-base-uncased)")
    g.add_argument("--chexbert_path", default=None, metavar="FILE",
                   help="CheXbert's chexbert.pth: CheXbert F1 on the 14 labels and the five findings")
    g.add_argument("--chexbert_tokenizer", default="bert-base-uncased", metavar="NAME_OR_PATH",
                   help="the tokenizer CheXbert reads (bert-base-uncased's), a hub id or a local folder")
    g.add_argument("--radgraph_path", default=None, metavar="DIR",
                   help="RadGraph F1: the folder StanfordAIMI/RRG_scorers' radgraph-xl.tar.gz (or radgraph.tar.gz) "
                        "unpacks to (config.json, vocabulary/, weights.th), or radgraph's cache folder holding it; "
                        "nothing is downloaded")
    g.add_argument("--radgraph_model_type", choices=["radgraph", "radgraph-xl"], default="radgraph-xl",
                   help="which RadGraph model the folder holds")
    g.add_argument("--radgraph_reward_level", choices=["simple", "partial", "complete", "all"], default="all",
                   help="F1RadGraph's reward level: simple (entities), partial (entities and whether they relate), "
                        "complete (entities and their relations), all (the three)")
    g.add_argument("--radgraph_bert", default=None, metavar="DIR",
                   help="a local folder with the config and tokenizer of the BERT the archive's config.json names "
                        "(default: that name from the Hugging Face cache)")
    g = p.add_argument_group("generation")
    g.add_argument("--batch_size", type=cli.positive_int, default=16)
    g.add_argument("--max_new_tokens", type=int, default=128)
    g.add_argument("--num_beams", type=int, default=1)
    g.add_argument("--device", default=None, help="default: cuda if available")
    g.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto")
    g.add_argument("--num_workers", type=int, default=0)
    args = p.parse_args(argv)
    if args.predictions_json:
        if args.model_path or args.llm_path or args.projector_path:
            p.error("--predictions_json scores saved predictions: pass it without a model")
    elif not args.model_path and not (args.llm_path and args.projector_path):
        p.error("pass --model_path, or both --llm_path and --projector_path, or --predictions_json")
    elif not args.image_root:
        p.error("--image_root is required to run a model (the test rows' images are read)")
    for flag in ("num_beams", "max_new_tokens", "batch_size", "limit"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            p.error(f"--{flag} {getattr(args, flag)}: must be >= 1")
    if args.num_workers < 0:
        p.error("--num_workers must be >= 0")
    args.device = cli.check_device(p, args.device)
    preflight.require_file(args.chexbert_path, "--chexbert_path", "checkpoint file (CheXbert's chexbert.pth)")
    if args.output_json is None:
        base = (Path(args.predictions_json).parent if args.predictions_json else Path(args.model_path)
                if args.model_path else Path(args.llm_path).parent)
        if args.model_path and not base.exists() and not base.is_absolute():  # a hub id: not a folder to write in
            base = Path("runs") / "eval" / args.model_path.replace("/", "--")
        prefix = "rescored" if args.predictions_json else "eval"
        args.output_json = str(base / f"{prefix}_{Path(args.test_json).stem}.json")
    out = Path(args.output_json)  # the summary, its table and its pictures
    for path in (out, out.with_suffix(".md"), out.with_suffix(".png"), out.with_name(out.stem + "_examples.png")):
        preflight.check_output_file(path, "--output_json", args.force)
    return args


if __name__ == "__main__" and cli.help_requested():
    parse_args()  # the help, without waiting seconds for the imports below

from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from base_vlm import is_base_vlm_config
from metrics import normalize_answer, report_metrics, token_f1, yes_no
from data_check import check_rows
from Stage2.dataset import ANSWER_KEY, QUESTION_KEY, VQACollator, VQADataset, pad_token_id
from Stage2.inference_vqa_stage2 import generate_answers, generation_kwargs, load_model, resolve_dtype

logger = logging.getLogger("siglip_med")
TYPES = ("closed", "location", "open")


def question_type(row) -> str:
    qt = row.get("question_type")
    if qt:
        return str(qt).strip().lower()
    return "closed" if _is_yes_no(str(row[ANSWER_KEY])) else "open"


def _is_yes_no(reference: str) -> bool:
    return normalize_answer(reference) in (["yes"], ["no"])


def closed_correct(prediction: str, reference: str) -> bool:
    """A closed answer's verdict: the yes/no verdict for a yes/no reference, else the whole
    normalised answer."""
    if _is_yes_no(reference):
        return yes_no(prediction) is not None and yes_no(prediction) == yes_no(reference)
    return normalize_answer(prediction) == normalize_answer(reference)


def score(rows, predictions, report_scorers=()) -> tuple[dict, list[dict]]:
    """(summary, per-example records) for references in `rows` and predicted strings.
    report_scorers (clinical_metrics') add their metrics to the report rows' summary."""
    records = []
    for row, pred in zip(rows, predictions):
        ref, qt = str(row[ANSWER_KEY]), question_type(row)
        p, r, f1 = token_f1(pred, ref)
        if qt == "closed":
            correct = closed_correct(pred, ref)
        else:
            correct = normalize_answer(pred) == normalize_answer(ref)
        records.append({"row": row["row"], "image": row["image"], "question": row[QUESTION_KEY], "reference": ref,
                        "prediction": pred, "question_type": qt, "finding": row.get("finding"),
                        "correct": bool(correct), "token_f1": f1, "precision": p, "recall": r})

    def mean(xs):
        xs = list(xs)
        return sum(xs) / len(xs) if xs else None

    summary: dict = {"n": len(records)}
    groups = defaultdict(list)
    for rec in records:
        groups[rec["question_type"]].append(rec)
    for qt in sorted(groups, key=lambda t: (TYPES.index(t) if t in TYPES else len(TYPES), t)):
        recs = groups[qt]
        summary[qt] = {"n": len(recs), "accuracy": mean(r["correct"] for r in recs),
                       "token_f1": mean(r["token_f1"] for r in recs), "recall": mean(r["recall"] for r in recs),
                       "precision": mean(r["precision"] for r in recs)}
    reports = groups.get("report", [])
    if reports:
        hyps, refs = [r["prediction"] for r in reports], [r["reference"] for r in reports]
        summary["report"].update(report_metrics(hyps, refs))
        for scorer in report_scorers:
            values, implementation = scorer(hyps, refs)
            summary["report"].update(values)
            summary["report"]["implementations"][scorer.name] = implementation
    closed = groups.get("closed", [])
    if closed:
        verdicts = Counter(yes_no(r["reference"]) if _is_yes_no(r["reference"]) else
                           " ".join(normalize_answer(r["reference"])) for r in closed)
        # Ties go to "no", the usual prior of screening questions; sorted() keeps it deterministic.
        majority, count = sorted(verdicts.items(), key=lambda kv: (-kv[1], kv[0] != "no", str(kv[0])))[0]
        summary["closed"].update(
            answered=mean(yes_no(r["prediction"]) is not None for r in closed if _is_yes_no(r["reference"])),
            majority_answer=majority, majority_accuracy=count / len(closed),
            by_finding={f: mean(r["correct"] for r in closed if r["finding"] == f)
                        for f in sorted({r["finding"] for r in closed if r["finding"]})})
    summary["all"] = {"n": len(records), "accuracy": mean(r["correct"] for r in records),
                      "token_f1": mean(r["token_f1"] for r in records), "recall": mean(r["recall"] for r in records)}
    return summary, records


def _rows_without_images(test_json) -> list[dict]:
    """The test rows for rescoring: questions and references only (images are not read)."""
    from data_rows import load_table
    rows, _ = load_table(test_json)
    if not isinstance(rows, list):
        raise cli.UserError(f"--test_json {test_json}: expected a JSON list of rows")
    bad = [i for i, r in enumerate(rows) if not isinstance(r, dict)
           or not str(r.get(QUESTION_KEY) or "").strip() or not str(r.get(ANSWER_KEY) or "").strip()]
    if bad:
        raise cli.UserError(f"--test_json {test_json}: rows {bad[:10]}{' ...' if len(bad) > 10 else ''} lack a "
                            f"{QUESTION_KEY!r} or an {ANSWER_KEY!r}; scoring needs both")
    return [{**r, "row": i, "image": r.get("image")} for i, r in enumerate(rows)]


def saved_predictions(path, rows: list[dict]) -> tuple[list[dict], list[str]]:
    """(the rows scored, their predictions) from a predictions file: one item per row in order
    (a string, or an object with `prediction`), or this script's OUTPUT_JSON, whose items name
    their row (a run that skipped bad rows scored only the others, and so does this)."""
    where = f"--predictions_json {path}"
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise cli.UserError(f"{where}: not readable as JSON ({e})") from e
    items = data.get("predictions") if isinstance(data, dict) else data
    if not isinstance(items, list):
        raise cli.UserError(f"{where}: expected a JSON list of predictions, or an evaluation's OUTPUT_JSON")

    def text(i, item):
        value = item.get("prediction") if isinstance(item, dict) else item
        if not isinstance(value, str):
            raise cli.UserError(f"{where}: item {i} is {type(value).__name__}, not a string or an object with a "
                                "'prediction' string")
        return value
    if items and all(isinstance(it, dict) and "row" in it for it in items):
        by_row = {it["row"]: text(i, it) for i, it in enumerate(items)}
        known = {r["row"] for r in rows}
        if set(by_row) - known:
            raise cli.UserError(f"{where}: predictions for rows the test file lacks: {sorted(set(by_row) - known)[:10]}"
                                "; pass the --test_json they were made on")
        kept = [r for r in rows if r["row"] in by_row]
        return kept, [by_row[r["row"]] for r in kept]
    if len(items) != len(rows):
        raise cli.UserError(f"{where}: {len(items)} predictions for {len(rows)} test rows; one per row, in order")
    return rows, [text(i, it) for i, it in enumerate(items)]


def format_table(summary: dict, markdown: bool = False) -> str:
    def cell(v):
        return "-" if v is None else f"{v:.3f}"

    kinds = [k for k in summary if isinstance(summary[k], dict) and "accuracy" in summary[k]]
    head = ["type", "n", "accuracy", "token F1", "recall"]
    rows = [[k, str(summary[k]["n"]), cell(summary[k]["accuracy"]), cell(summary[k]["token_f1"]),
             cell(summary[k]["recall"])] for k in kinds]
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
    else:
        lines = [f"{head[0]:<10}{head[1]:>6}{head[2]:>10}{head[3]:>10}{head[4]:>8}"]
        lines += [f"{r[0]:<10}{r[1]:>6}{r[2]:>10}{r[3]:>10}{r[4]:>8}" for r in rows]
    if "report" in summary:
        r = summary["report"]
        keys = ["BLEU-1", "BLEU-4", "ROUGE-L", "METEOR", "BERTScore-F1"]
        keys += [f"CheXbert-F1-{a}-{n}" for n in ("14", "5") for a in ("micro", "macro")]
        keys += [f"RadGraph-F1-{level}" for level in ("simple", "partial", "complete")]
        lines += ["", "report: " + ", ".join(f"{k} {cell(r.get(k))}" for k in keys if k in r)]
        lines += [f"  {k}: {v}" for k, v in r["implementations"].items()]
    if "closed" in summary:
        c = summary["closed"]
        lines += ["", f"closed: majority-answer baseline (always \"{c['majority_answer']}\") "
                      f"{c['majority_accuracy']:.3f}; model {c['accuracy']:.3f}"
                      + (f"; {c['answered']:.3f} of yes/no answers hold a verdict" if c["answered"] is not None
                         else "")]
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stderr, level=logging.INFO, force=True)
    preflight.check_data_file(args.test_json, "--test_json")
    if args.predictions_json:
        rows, predictions = saved_predictions(args.predictions_json, _rows_without_images(args.test_json))
        if args.limit:
            rows, predictions = rows[: args.limit], predictions[: args.limit]
        return _report(args, rows, predictions, f"predictions {args.predictions_json}", [], _report_scorers(args, rows))
    # References are required here, not for generation; every row is checked before the model loads.
    rows, bad = check_rows(args.test_json, args.image_root, ("image", QUESTION_KEY, ANSWER_KEY), image_key="image",
                           on_bad_sample=args.on_bad_sample)
    scorers = _report_scorers(args, rows)  # before the model: a wrong CheXbert or RadGraph path fails in seconds
    model, tokenizer, image_processor, source = load_model(
        args.model_path, llm_path=args.llm_path, projector_path=args.projector_path,
        vision_model_name=args.vision_model_name, device=args.device, dtype=resolve_dtype(args.dtype, args.device))
    own = is_base_vlm_config(model.config)  # a Gemma 3 multimodal model: image_processor is its whole processor
    ds = VQADataset(args.test_json, args.image_root, tokenizer, image_processor.image_processor if own else
                    image_processor, model.config, max_q_len=args.max_q_len, with_answers=False,
                    collect_bad_rows=bool(bad), processor=image_processor if own else None)
    if bad:
        good = {r["row"] for r in rows}
        ds.drop_rows([k for k, r in enumerate(ds.rows) if r["row"] not in good])
    if args.limit:
        ds.rows, rows = ds.rows[: args.limit], rows[: args.limit]
    loader = DataLoader(ds, batch_size=args.batch_size, num_workers=args.num_workers,
                        collate_fn=VQACollator(pad_token_id(tokenizer), padding_side="left"))
    gen = generation_kwargs(tokenizer, max_new_tokens=args.max_new_tokens, num_beams=args.num_beams)
    predictions = [""] * len(ds)
    for batch in tqdm(loader, desc="evaluate", file=sys.stderr):
        for i, answer in zip(batch["index"].tolist(), generate_answers(model, tokenizer, batch, **gen)):
            predictions[i] = answer
    return _report(args, rows, predictions, source, bad, scorers)


def _report_scorers(args, rows) -> list:
    """The model-based report metrics the flags ask for, loaded; none without report rows."""
    if not any(question_type(r) == "report" for r in rows):
        if args.chexbert_path or args.radgraph_path or (args.bertscore_model or "none").lower() != "none":
            logger.warning("no test row has question_type report: --chexbert_path, --radgraph_path and "
                           "--bertscore_model are unused")
        return []
    from clinical_metrics import BertScore, CheXbert, RadGraphF1
    scorers = []
    if (args.bertscore_model or "").lower() != "none":
        scorers.append(BertScore(args.bertscore_model, num_layers=args.bertscore_num_layers, idf=args.bertscore_idf,
                                 rescale_with_baseline=args.bertscore_rescale_with_baseline, device=args.device))
        logger.info("BERTScore: %s", scorers[-1].implementation)
    if args.chexbert_path:
        scorers.append(CheXbert(args.chexbert_path, tokenizer=args.chexbert_tokenizer, device=args.device))
    if args.radgraph_path:
        scorers.append(RadGraphF1(args.radgraph_path, model_type=args.radgraph_model_type,
                                  reward_level=args.radgraph_reward_level, bert=args.radgraph_bert, device=args.device))
    return scorers


def _report(args, rows, predictions, source, bad, scorers=()) -> dict:
    """Score, print the table, write OUTPUT_JSON and its Markdown table; the summary."""
    summary, records = score(rows, predictions, scorers)
    summary.update(model=source, test_json=str(args.test_json))
    if bad:
        summary["skipped"] = [asdict(b) for b in bad]
    table = format_table(summary)
    print(table)
    out = Path(args.output_json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"summary": summary, "predictions": records}, indent=1))
    out.with_suffix(".md").write_text(f"# VQA evaluation: {args.test_json}\n\nModel: {source}\n\n"
                                      + format_table(summary, markdown=True) + "\n")
    from plots import vqa_accuracy, vqa_examples
    written = [vqa_accuracy(summary, out.with_suffix(".png"))]
    if args.image_root and records:  # rescoring may have no images at hand
        written.append(vqa_examples(records, args.image_root, out.with_name(out.stem + "_examples.png")))
    logger.info("wrote %s, %s and %s", out, out.with_suffix(".md"), ", ".join(map(str, written)))
    return summary


if __name__ == "__main__":
    cli.run(main)
