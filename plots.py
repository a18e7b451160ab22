"""The pictures of a run and of an evaluation, as PNG files (matplotlib, headless):

    training_curves(run_dir)        loss, learning rate and validation metrics from metrics.jsonl
    vqa_accuracy(summary, path)     Stage2: each question type's score, and closed accuracy by
                                    finding, with the majority-answer baseline
    vqa_examples(records, ...)      Stage2: a page of test images with question, answer, reference
    roc_curves(curves, path)        Stage0: one ROC curve per finding, its AUC in the legend
    confusion(matrix, names, path)  Stage0: true class x top-1 predicted class, row-normalised

Each returns the path it wrote. matplotlib is imported when a picture is drawn, so nothing
else pays for it.
"""
from __future__ import annotations

import json
import math
from pathlib import Path


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")  # no display on a cluster node; set before pyplot loads
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def read_metrics(run_dir) -> list[dict]:
    """The rows of RUN_DIR/metrics.jsonl; a line cut short by a crash is passed over."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file; pass a training run's --output_dir (it writes metrics.jsonl)")
    rows = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and "step" in row:
            rows.append(row)
    return rows


def _series(rows, key) -> tuple[list, list]:
    points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return [s for s, _ in points], [v for _, v in points]


def training_curves(run_dir, path=None) -> Path:
    """Training loss, learning rate and every validation metric against the step, one panel
    each, from RUN_DIR/metrics.jsonl. Written to RUN_DIR/training_curves.png by default."""
    rows = read_metrics(run_dir)
    val_keys = sorted({k for r in rows for k in r if k.startswith("val/")})
    panels = [k for k in ("train/loss", "train/lr") if _series(rows, k)[0]] + val_keys
    if not panels:
        raise ValueError(f"{Path(run_dir) / 'metrics.jsonl'}: no train/loss, train/lr or val/ values to draw yet")
    plt = _pyplot()
    cols = min(3, len(panels))
    nrows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.0 * nrows), squeeze=False)
    for ax, key in zip(axes.flat, panels):
        steps, values = _series(rows, key)
        ax.plot(steps, values, marker="o" if key.startswith("val/") else None, markersize=3)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(Path(run_dir).name)
    return _save(fig, path or Path(run_dir) / "training_curves.png")


def vqa_accuracy(summary: dict, path) -> Path:
    """Bars of each question type's own score (closed and location: accuracy; open: recall of
    the reference's words; report: ROUGE-L) and, for closed questions, accuracy per finding,
    with the majority-answer baseline as a line."""
    plt = _pyplot()
    metric = {"open": "recall", "report": "ROUGE-L"}
    kinds = [k for k in summary if isinstance(summary[k], dict) and k != "all"
             and summary[k].get(metric.get(k, "accuracy")) is not None]
    by_finding = (summary.get("closed") or {}).get("by_finding") or {}
    fig, axes = plt.subplots(1, 2 if by_finding else 1, figsize=(9 if by_finding else 4.5, 3.2), squeeze=False)
    ax = axes[0][0]
    values = [summary[k][metric.get(k, "accuracy")] for k in kinds]
    ax.bar([f"{k}\n({metric.get(k, 'accuracy')})" for k in kinds], values, color="tab:blue")
    for x, (k, v) in enumerate(zip(kinds, values)):
        ax.text(x, v, f"n={summary[k]['n']}", ha="center", va="bottom", fontsize=8)
    base = (summary.get("closed") or {}).get("majority_accuracy")
    if base is not None:
        ax.axhline(base, color="tab:red", linestyle="--", label="closed: majority answer")
        ax.legend(fontsize=8, loc="upper right")
    ax.set_ylim(0, 1.15)
    ax.set_title("score by question type")
    if by_finding:
        ax = axes[0][1]
        names = list(by_finding)
        ax.barh(names, [by_finding[n] or 0 for n in names], color="tab:green")
        ax.set_xlim(0, 1.0)
        ax.set_title("closed accuracy by finding")
    return _save(fig, path)


def vqa_examples(records: list[dict], image_root, path, n: int = 12) -> Path:
    """A page of `n` test images (the first ones, right and wrong alike) with the question, the
    model's answer and the reference under each."""
    import textwrap

    from image_loader import load_image, resolve_image_path
    plt = _pyplot()
    shown = records[:n]
    cols = min(4, max(1, len(shown)))
    nrows = max(1, math.ceil(len(shown) / cols))
    fig, axes = plt.subplots(nrows, cols, figsize=(3.3 * cols, 3.9 * nrows), squeeze=False)
    for ax, r in zip(axes.flat, shown):
        ax.imshow(load_image(resolve_image_path(r["image"], image_root)))
        mark = "right" if r.get("correct") else "wrong"
        text = (f"Q: {r['question']}\nA: {r['prediction']}\nref: {r['reference']} ({mark})")
        ax.set_title("\n".join(textwrap.fill(t, 38) for t in text.splitlines()), fontsize=7, loc="left",
                     color="black" if r.get("correct") else "tab:red")
        ax.axis("off")
    for ax in list(axes.flat)[len(shown):]:
        ax.axis("off")
    return _save(fig, path)


def roc_curves(curves: dict[str, tuple[list, list, float]], path, title: str = "zero-shot ROC") -> Path:
    """`curves`: {finding: (false positive rates, true positive rates, AUC)}."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    for name, (fpr, tpr, auc) in curves.items():
        ax.plot(fpr, tpr, label=f"{name} (AUC {auc:.3f})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title)
    ax.legend(fontsize=7, loc="lower right")
    return _save(fig, path)


def confusion(matrix, names: list[str], path, title: str = "class retrieval: true x top-1") -> Path:
    """Row-normalised (each true class sums to 1) image of a K x K count matrix."""
    import numpy as np
    m = np.asarray(matrix, dtype=float)
    m = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
    plt = _pyplot()
    size = max(4.0, 0.45 * len(names) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    im = ax.imshow(m, vmin=0, vmax=1, cmap="Blues")
    ax.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.set_xlabel("predicted (top-1)")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046)
    return _save(fig, path)
