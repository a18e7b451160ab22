"""Evaluation metrics shared by the stages (retrieval, zero-shot AUC, VQA answers)."""
from __future__ import annotations

import re
from collections import Counter

import numpy as np
import torch
from sklearn.metrics import roc_auc_score


def retrieval_recall(sim: torch.Tensor, query_targets: list[set[int]] | torch.Tensor,
                     ks=(1, 5)) -> dict[int, float]:
    """Recall@K: the share of queries with at least one correct key in their top K.

    sim is [queries, keys]. query_targets[q] is the key index (or set of indices) that count
    as correct for query q: identical captions are one key, and every image of a caption is
    a correct answer for it, so duplicates in the data never count as misses.
    """
    if torch.is_tensor(query_targets):
        query_targets = [{int(t)} for t in query_targets]
    order = sim.float().argsort(dim=1, descending=True).cpu()
    out = {}
    for k in ks:
        top = order[:, :k].tolist()
        hits = [bool(t & set(row)) for row, t in zip(top, query_targets)]
        out[k] = float(np.mean(hits)) if hits else float("nan")
    return out


def image_text_retrieval(image_emb: torch.Tensor, text_emb: torch.Tensor,
                         caption_ids: torch.Tensor, ks=(1, 5)) -> dict[str, float]:
    """Image->text and text->image R@K with deduplicated captions (text_emb has one row per
    distinct caption; caption_ids[i] is image i's caption row)."""
    sim = image_emb.float() @ text_emb.float().T
    i2t = retrieval_recall(sim, caption_ids, ks)
    images_of = [set() for _ in range(text_emb.shape[0])]
    for i, c in enumerate(caption_ids.tolist()):
        images_of[c].add(i)
    used = [c for c in range(text_emb.shape[0]) if images_of[c]]
    t2i = retrieval_recall(sim.T[used], [images_of[c] for c in used], ks)
    return {**{f"i2t_R@{k}": v for k, v in i2t.items()}, **{f"t2i_R@{k}": v for k, v in t2i.items()}}


def auc(scores, labels) -> float:
    """ROC AUC, NaN when only one class is present (instead of raising)."""
    labels = np.asarray(labels)
    if labels.min() == labels.max():
        return float("nan")
    return float(roc_auc_score(labels, np.asarray(scores, dtype=np.float64)))


# ---------------------------------------------------------------- VQA answers

_ARTICLES = {"a", "an", "the"}


def normalize_answer(text: str) -> list[str]:
    """Lower-case word tokens without punctuation or articles (SQuAD-style)."""
    words = re.findall(r"[a-z0-9]+", text.lower())
    return [w for w in words if w not in _ARTICLES]


def token_f1(prediction: str, reference: str) -> tuple[float, float, float]:
    """(precision, recall, F1) over normalised word tokens."""
    pred, ref = normalize_answer(prediction), normalize_answer(reference)
    if not pred or not ref:
        same = float(pred == ref)
        return same, same, same
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0, 0.0, 0.0
    p, r = common / len(pred), common / len(ref)
    return p, r, 2 * p * r / (p + r)


def yes_no(text: str) -> str | None:
    """The yes/no verdict of a free-text answer: its first 'yes' or 'no' word, else None."""
    for w in normalize_answer(text):
        if w in ("yes", "no"):
            return w
    return None


# ---------------------------------------------------------------- class retrieval (seed 004)

def classification_metrics(y_true: list[int], y_pred: list[int], class_names: list[str]) -> dict:
    """Top-1 accuracy, macro precision/recall/F1 (scikit-learn, zero_division=0) and a per-class
    table (support, recall, F1) over the classes present in y_true."""
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support
    labels = sorted(set(y_true))
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=labels, average=None, zero_division=0)
    mp, mr, mf, _ = precision_recall_fscore_support(y_true, y_pred, labels=labels, average="macro", zero_division=0)
    return {"accuracy": float(accuracy_score(y_true, y_pred)), "macro_precision": float(mp),
            "macro_recall": float(mr), "macro_f1": float(mf),
            "per_class": {class_names[c]: {"support": int(n), "recall": float(rc), "f1": float(fc)}
                          for c, n, rc, fc in zip(labels, s, r, f)}}


def class_recall_at_k(scores: torch.Tensor, true_sets: list[set[int]], ks=(1, 5)) -> dict[str, float]:
    """R@K over all class prompts: the share of images with a true class among the K best."""
    return {f"R@{k}": v for k, v in retrieval_recall(scores, true_sets, ks).items()}


def distractor_top1(scores: torch.Tensor, true_class: list[int], n_distractors: int = 9, seed: int = 0) -> float:
    """The seed's test: one correct class among n random distractors (fixed seed); the share of
    images whose correct class scores highest. Chance is 1/(n+1) (10% for 9 distractors)."""
    rng = np.random.default_rng(seed)
    k = scores.shape[1]
    hits = []
    for i, c in enumerate(true_class):
        others = rng.choice([j for j in range(k) if j != c], size=min(n_distractors, k - 1), replace=False)
        cand = [c, *others.tolist()]
        hits.append(int(scores[i, cand].argmax().item() == 0))
    return float(np.mean(hits)) if hits else float("nan")
