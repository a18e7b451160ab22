"""Query a Stage0 model (any tower pairing) with text: which description fits an image best.

One image, queries ranked by sigmoid score (the SigLIP loss's own probability of a match):

    python Stage0/inference_stage0.py --model_path runs/knee/best_model --image_path knee.png \\
        --queries "Normal knee X-ray." "Severe OA of the knee with varus angulation."

A whole CSV or JSON file (the formats training reads), one output row per input row, in order:

    python Stage0/inference_stage0.py --model_path runs/knee/best_model --csv_path knee.csv --split test \\
        --output_path runs/knee/test_predictions.csv

Without --queries the distinct texts of the file's text column are the queries. The output has
the image path, `top_match`, `top_score` and one score column per query. Every row is checked
before the model loads, as training checks it: a bad row (missing or unreadable image, empty
text) stops the run with every bad row listed (--on_bad_sample error, the default), or, with
--on_bad_sample skip, is left out of scoring and written in its place with its image path and
empty prediction columns (the log lists why). An existing --output_path is replaced only with
--force.

A model trained on labelled data (--label_column) is queried, without --queries, with the class
prompts it was trained on (its class_prompts.json: classes and template); --classes_file and
--class_prompt_template build class prompts for any model, or override the recorded ones.
"""
from __future__ import annotations

import argparse
import csv
import logging
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cli
import preflight


def parse_args(argv=None):
    p = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_path", required=True, help="a Stage0 final_model/ or best_model/ (any towers)")
    g = p.add_argument_group("one image")
    g.add_argument("--image_path", default=None, help="PNG, JPEG or DICOM")
    g.add_argument("--queries", nargs="+", default=None, help="texts to score against the image(s)")
    g = p.add_argument_group("a data file")
    g.add_argument("--csv_path", default=None, help="a CSV or JSON data file, as training reads them")
    g.add_argument("--output_path", default=None, help="the predictions CSV to write")
    g.add_argument("--force", action="store_true", help="replace an existing --output_path")
    g.add_argument("--on_bad_sample", choices=["error", "skip"], default="error",
                   help="rows whose image is missing or unreadable, or whose text is empty: error lists them all "
                        "and stops before the model loads; skip writes them with an empty prediction")
    g.add_argument("--image_root", default="", help="folder relative image paths are under (CSV: its folder)")
    g.add_argument("--img_path_column", "--image_key", dest="image_key", default=None)
    g.add_argument("--findings_column", "--impression_column", "--caption_key", dest="caption_key", default=None)
    g.add_argument("--split_column", default=None, help="with --split: only that split's rows")
    g.add_argument("--split", default=None, help="e.g. test (uses the 'split' column unless --split_column)")
    g.add_argument("--batch_size", type=cli.positive_int, default=32)
    g = p.add_argument_group("class prompts as the queries (labelled data)")
    g.add_argument("--classes_file", default=None,
                   help="condition,description,icd10: one query per class (default for a model trained with "
                        "--label_column: the classes in its class_prompts.json)")
    g.add_argument("--class_prompt_template", default=None,
                   help="{condition}/{description} wording of the class prompts (default: the training one, "
                        "from the model's class_prompts.json; else the seed's)")
    p.add_argument("--image_size", type=int, default=None, help=argparse.SUPPRESS)  # the seed's; the model fixes it
    p.add_argument("--device", default=None, help="default: cuda when a GPU is visible, else cpu")
    args = p.parse_args(argv)
    if bool(args.image_path) == bool(args.csv_path):
        p.error("pass --image_path (one image) or --csv_path (a data file), not both")
    if args.image_path and not args.queries and not class_queries_wanted(args):
        p.error("--image_path needs --queries (or --classes_file: one query per class)")
    if args.csv_path and not args.output_path:
        p.error("--csv_path needs --output_path")
    if args.csv_path:
        preflight.check_output_file(args.output_path, "--output_path", args.force)
    if args.queries is not None and not all(q.strip() for q in args.queries):
        p.error("--queries must not be empty")
    if args.split and not args.split_column:
        args.split_column = "split"
    args.device = cli.check_device(p, args.device)
    return p, args


if __name__ == "__main__" and cli.help_requested():
    parse_args()  # the help, without waiting seconds for the imports below

import torch
from torch.utils.data import DataLoader, Dataset

from data_check import BadDataError, check_rows, position
from data_rows import load_table
from image_cache import load_cached, open_cache
from image_loader import ImageLoadError, prepare_image
from Stage0.dataset import data_keys
from Stage0.towers import embed, load_model, text_length
from volume_loader import load_input

logger = logging.getLogger("siglip_med")


class ImageFiles(Dataset):
    """The rows' images (or volumes) through the model's processor, in row order."""

    def __init__(self, rows, processor, source, *, image_root=None, image_key=None):
        self.rows, self.processor, self.source = rows, processor, source
        self.cache = open_cache(source, processor, rows, image_root=image_root, image_key=image_key) if source else None

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        r = self.rows[i]
        image = load_cached(r["image_path"], row=r["row"], source=self.source, cache=self.cache,
                            processor=self.processor)
        return self.processor(images=image, return_tensors="pt")["pixel_values"][0]


@torch.no_grad()
def score(model, tokenizer, pixel_batches, queries, device) -> torch.Tensor:
    """[images, queries] sigmoid(t * cos + b): the model's probability that the pair matches."""
    max_len = text_length(model.text, tokenizer, None)
    ids, mask = model.text.tokenize(tokenizer, list(queries), max_len)
    _, txt = embed(model, input_ids=ids.to(device), attention_mask=mask.to(device))
    t, b = model.logit_scale.exp(), model.logit_bias
    out = []
    for px in pixel_batches:
        img, _ = embed(model, pixel_values=px.to(device))
        out.append(torch.sigmoid(t * img.float() @ txt.float().T + b).cpu())
    return torch.cat(out)


def class_queries_wanted(args) -> bool:
    from Stage0.labels import read_prompt_record
    return not args.queries and bool(args.classes_file or args.class_prompt_template
                                     or read_prompt_record(args.model_path))


def class_queries(args) -> list[str] | None:
    """The class prompts as the queries, sorted by class as training and evaluation order them:
    the classes and template a labelled model was trained with unless the flags say otherwise
    (a template that differs from training's is warned about). None: not class queries."""
    from Stage0.labels import class_texts, read_classes, resolve_prompts
    if not class_queries_wanted(args):
        return None
    classes = read_classes(args.classes_file) if args.classes_file else {}
    template, classes = resolve_prompts(args.model_path, args.class_prompt_template, classes)
    if not classes:
        raise ValueError(f"{args.classes_file}: no classes" if args.classes_file else
                         "--class_prompt_template needs --classes_file: this model records no classes "
                         "(it was not trained with --label_column)")
    return class_texts(sorted(classes), classes, template)


def main(argv=None):
    parser, args = parse_args(argv)
    logging.basicConfig(format="%(levelname)s %(message)s", stream=sys.stderr, level=logging.INFO, force=True)
    # The inputs before the model: a wrong path fails at once, not after the model has loaded.
    if args.image_path:
        try:
            image = load_input(args.image_path)
        except ImageLoadError as e:
            parser.error(str(e))
    else:
        image_key, caption_key = data_keys(args.csv_path, args.image_key, args.caption_key)
        keys = (image_key,) if args.queries or class_queries_wanted(args) else (image_key, caption_key)
        try:
            rows, bad = check_rows(args.csv_path, args.image_root, keys, image_key=image_key,
                                   on_bad_sample=args.on_bad_sample, split_column=args.split_column,
                                   split=args.split, what=f" (written to {args.output_path} with an empty prediction)")
        except BadDataError:
            raise  # its list of rows stays a list
        except (FileNotFoundError, ValueError) as e:
            parser.error(str(e))
    try:
        class_prompts = class_queries(args)
    except (FileNotFoundError, ValueError) as e:
        parser.error(str(e))
    if class_prompts is not None:
        args.queries = class_prompts
    try:
        preflight.require_checkpoint(args.model_path, "--model_path", {"stage0"}, "a Stage0 model",
                                     "pass a Stage0 output folder such as runs/stage0/final_model")
        model, tokenizer, processor = load_model(args.model_path)
    except (FileNotFoundError, OSError, ValueError) as e:
        parser.error(str(e))
    model.to(args.device).eval()
    if args.image_path:
        # As training saw it: padded to a square when the model records --pad_to_square.
        px = processor(images=prepare_image(image, processor), return_tensors="pt")["pixel_values"]
        scores = score(model, tokenizer, [px], args.queries, args.device)[0]
        ranked = sorted(zip(args.queries, scores.tolist()), key=lambda x: -x[1])
        for q, s in ranked:
            print(f"{s:.4f}\t{q}")
        return ranked
    queries = args.queries or list(dict.fromkeys(str(r[caption_key]).strip() for r in rows))
    loader = DataLoader(ImageFiles(rows, processor, args.csv_path, image_root=args.image_root, image_key=image_key),
                        batch_size=args.batch_size)
    scores = score(model, tokenizer, loader, queries, args.device)
    best = scores.argmax(dim=1)
    lines = {position(r["row"]): [r[image_key], queries[k], f"{s[k]:.6f}", *(f"{v:.6f}" for v in s)]
             for r, k, s in zip(rows, best.tolist(), scores.tolist())}
    if bad:  # one output row per input row, in order: a skipped row keeps its place, unscored
        table = load_table(args.csv_path)[0]
        first = 2 if str(args.csv_path).lower().endswith(".csv") else 0  # a CSV's first row is line 2
        for b in bad:
            raw = table[position(b.row) - first]
            lines[position(b.row)] = [raw.get(image_key) or "" if isinstance(raw, dict) else "", "", "",
                                      *[""] * len(queries)]
    out = Path(args.output_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image_path", "top_match", "top_score", *queries])
        w.writerows(lines[k] for k in sorted(lines))
    if class_prompts is None and caption_key in rows[0]:  # class prompts are not the rows' texts
        hits = sum(queries[k] == str(r[caption_key]).strip() for r, k in zip(rows, best.tolist()))
        logger.info("top-1 accuracy against the %s column: %.4f (%d of %d)", caption_key, hits / len(rows), hits,
                    len(rows))
    logger.info("wrote %d rows to %s%s", len(lines), out, f" ({len(bad)} skipped, unscored)" if bad else "")
    return out


if __name__ == "__main__":
    cli.run(main)
