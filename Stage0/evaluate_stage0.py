"""Evaluate one or more SigLIP checkpoints on a test JSON: SigLIP loss, image<->text R@1/R@5
and, given a findings file, per-finding zero-shot ROC AUC from the prompt pair
"<finding>" vs "no <finding>" (score = sim(image, positive) - sim(image, negative)).

    python Stage0/evaluate_stage0.py --model_path runs/stage0/final_model \\
        --test_json data/demo/stage0_test.json --image_root data/demo \\
        --findings_json data/demo/findings.json --output_json runs/stage0/test_metrics.json
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from metrics import auc
from Stage0.dataset import ImageTextContrastiveDataset, collate_fn
from Stage0.towers import load_model, text_length
from Stage0.train_vision_encoder_stage0 import reinit_image_backbone
from Stage0.trainer import DualEncoder, evaluate_contrastive

logger = logging.getLogger("siglip_med")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_path", nargs="+", required=True, help="one or more Stage0 model folders")
    p.add_argument("--labels", nargs="+", default=None, help="column names for the table")
    p.add_argument("--reinit_vision_tower", nargs="*", default=[],
                   help="labels of models to evaluate with a random vision tower (a fine-tune's start)")
    p.add_argument("--test_json", required=True)
    p.add_argument("--image_root", default="")
    p.add_argument("--findings_json", default=None,
                   help='list of {"name", "positive_prompt", "negative_prompt"}; rows need "labels"')
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output_json", default=None)
    return p.parse_args(argv)


@torch.no_grad()
def zero_shot_auc(encoder, dataset, findings, tokenizer, max_len, batch_size, device) -> dict[str, float]:
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
        out[f"AUC {f['name']}"] = auc((sim[:, 2 * j] - sim[:, 2 * j + 1]).cpu().numpy(), labels)
    vals = [v for v in out.values() if v == v]
    out["AUC mean"] = sum(vals) / len(vals) if vals else float("nan")
    return out


def evaluate_model(path, args, findings, reinit=False) -> dict[str, float]:
    torch.manual_seed(args.seed)
    model, tokenizer, image_processor = load_model(path)
    if reinit:
        reinit_image_backbone(model)
    model.to(args.device).eval()
    max_len = text_length(model.text, tokenizer, None)
    ds = ImageTextContrastiveDataset(args.test_json, args.image_root, image_processor, tokenizer, max_len,
                                     tokenize=lambda texts, n: model.text.tokenize(tokenizer, texts, n))
    encoder = DualEncoder(model)
    out = evaluate_contrastive(encoder, ds, args.batch_size, args.device)
    if findings:
        out.update(zero_shot_auc(encoder, ds, findings, tokenizer, max_len, args.batch_size, args.device))
    return out


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
    findings = json.loads(Path(args.findings_json).read_text()) if args.findings_json else None
    results = {lab: evaluate_model(p, args, findings, reinit=lab in args.reinit_vision_tower)
               for lab, p in zip(labels, args.model_path)}
    print(format_table(results))
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
