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
