"""Evaluation metrics shared by the stages (retrieval, zero-shot AUC, VQA answers)."""
from __future__ import annotations

import re
from collections import Counter

import numpy as np
import torch
from sklearn.metrics import roc_auc_score


def _hit_at_k(sim: torch.Tensor, query_targets: list[set[int]], ks) -> dict[int, torch.Tensor]:
    """Per query, the chance that a correct key is among the top K when tied scores are put in
    a uniformly random order: with `above` keys strictly better than the best correct one and m
    keys tied with it (r of them correct), it is 0 when above >= K, else
    1 - C(m - r, K - above) / C(m, K - above). Untied scores give the plain 0 or 1. A NaN score
    ranks last."""
    sim = torch.nan_to_num(sim.float(), nan=float("-inf"))
    q = torch.tensor([i for i, t in enumerate(query_targets) for _ in t], dtype=torch.long, device=sim.device)
    key = torch.tensor([j for t in query_targets for j in t], dtype=torch.long, device=sim.device)
    vals = sim[q, key]
    best = torch.full((sim.shape[0],), float("-inf"), dtype=sim.dtype, device=sim.device)
    best = best.scatter_reduce(0, q, vals, reduce="amax")
    above = (sim > best[:, None]).sum(1).double()
    tied = (sim == best[:, None]).sum(1).double()
    correct = torch.zeros_like(tied).index_add_(0, q, (vals == best[q]).double())
    out = {}
    for k in ks:
        slots = (k - above).clamp(min=0)
        # log C(m - r, L) - log C(m, L); C(m - r, L) = 0 (a sure hit) when m - r < L
        spare = tied - correct
        log_miss = (torch.lgamma(spare + 1) - torch.lgamma((spare - slots).clamp(min=0) + 1)
                    - torch.lgamma(tied + 1) + torch.lgamma((tied - slots).clamp(min=0) + 1))
        miss = torch.where(spare < slots, 0.0, log_miss.exp())
        out[k] = torch.where((slots > 0) & (correct > 0), 1 - miss, 0.0).cpu()
    return out


def retrieval_recall(sim: torch.Tensor, query_targets: list[set[int]] | torch.Tensor,
                     ks=(1, 5)) -> dict[int, float]:
    """Recall@K: the share of queries with at least one correct key in their top K.

    sim is [queries, keys]. query_targets[q] is the key index (or set of indices) that count
    as correct for query q: identical captions are one key, and every image of a caption is
    a correct answer for it, so duplicates in the data never count as misses.

    Ties count by their expected rank: keys with equal scores are taken in a uniformly random
    order, so a tie of m keys holding the correct one for the last L slots scores L/m (see
    `_hit_at_k`). Taking the first index instead (argsort, argmax) let a collapsed model, whose
    scores all tie, score whatever the key order favoured; by expected rank it scores chance, K/N.
    """
    if torch.is_tensor(query_targets):
        query_targets = [{int(t)} for t in query_targets]
    if not query_targets:
        return {k: float("nan") for k in ks}
    return {k: float(h.mean()) for k, h in _hit_at_k(sim, query_targets, ks).items()}


def image_text_retrieval(image_emb: torch.Tensor, text_emb: torch.Tensor,
                         caption_ids: torch.Tensor, ks=(1, 5)) -> dict[str, float]:
    """Image->text and text->image R@K with deduplicated captions (text_emb has one row per
    distinct caption; caption_ids[i] is image i's caption row); ties by expected rank
    (`retrieval_recall`)."""
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


# ---------------------------------------------------------------- report generation

def _report_tokens(text: str) -> list[str]:
    """Lower-case words and numbers, punctuation dropped (articles kept, unlike VQA answers:
    BLEU's n-grams run across them)."""
    return re.findall(r"[a-z0-9]+", text.lower())


def report_metrics(predictions: list[str], references: list[str]) -> dict:
    """The natural-language metrics report-generation papers give, from maintained libraries:
    corpus BLEU-1 and BLEU-4 (NLTK), mean ROUGE-L F1 (Google's rouge-score), mean METEOR (NLTK,
    when its WordNet data is installed; otherwise None with the reason). `implementations`
    names each library and version, so a table says what it was computed with."""
    import warnings
    from importlib.metadata import version

    from nltk.translate.bleu_score import corpus_bleu
    from rouge_score import rouge_scorer
    hyps = [_report_tokens(p) for p in predictions]
    refs = [[_report_tokens(r)] for r in references]
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    def bleu(weights):
        if not hyps:
            return None
        with warnings.catch_warnings():  # NLTK warns when an n-gram order has no overlap ...
            warnings.simplefilter("ignore")
            value = float(corpus_bleu(refs, hyps, weights=weights))
        return value if value > 1e-100 else 0.0  # ... and returns 1e-155 for the 0 it means
    out = {"n": len(predictions), "BLEU-1": bleu((1, 0, 0, 0)), "BLEU-4": bleu((0.25,) * 4),
           "ROUGE-L": (sum(scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references))
                       / len(predictions)) if predictions else None}
    impl = {"BLEU": f"nltk {version('nltk')} corpus_bleu", "ROUGE-L": f"rouge-score {version('rouge-score')}"}
    try:
        from nltk.translate.meteor_score import meteor_score
        out["METEOR"] = (sum(meteor_score(r, h) for h, r in zip(hyps, refs)) / len(hyps)) if hyps else None
        impl["METEOR"] = f"nltk {version('nltk')} meteor_score"
    except LookupError:  # NLTK's WordNet corpus is a separate download
        out["METEOR"] = None
        impl["METEOR"] = ("unavailable: NLTK's WordNet data is not installed (python -m nltk.downloader wordnet "
                          "where the network is reachable, or point NLTK_DATA at a copy)")
    out["implementations"] = impl
    return out


# ---------------------------------------------------------------- class retrieval (seed 004)

def classification_metrics(y_true: list[int], y_pred: list[int], class_names: list[str],
                           sample_weight: list[float] | None = None) -> dict:
    """Top-1 accuracy, macro precision/recall/F1 (scikit-learn, zero_division=0) and a per-class
    table (support, recall, F1) over the classes present in y_true. sample_weight weighs each
    (true, predicted) pair (supports are then weight sums): `top1_classification` splits a tied
    image over its tied classes."""
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support
    labels = sorted(set(y_true))
    kw = {"labels": labels, "zero_division": 0, "sample_weight": sample_weight}
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, average=None, **kw)
    mp, mr, mf, _ = precision_recall_fscore_support(y_true, y_pred, average="macro", **kw)
    return {"accuracy": float(accuracy_score(y_true, y_pred, sample_weight=sample_weight)),
            "macro_precision": float(mp), "macro_recall": float(mr), "macro_f1": float(mf),
            "per_class": {class_names[c]: {"support": int(n) if float(n).is_integer() else float(n),
                                           "recall": float(rc), "f1": float(fc)}
                          for c, n, rc, fc in zip(labels, s, r, f)}}


def top1_classification(scores: torch.Tensor, true_classes: list[list[int]], class_names: list[str]) -> dict:
    """`classification_metrics` of the top-scoring class of each image, [images, classes] scores.
    true_classes[i] lists image i's classes, the first its primary one: a predicted class among
    them is correct, any other prediction is an error on the primary class.

    Ties count by their expected rank, as in `retrieval_recall`: an image whose top score is
    shared by m classes counts 1/m for each of them (the expected confusion matrix under a
    random tie break), so accuracy is exact in expectation and a collapsed model scores 1/K
    instead of argmax's first index. Untied scores give the plain argmax metrics."""
    s = torch.nan_to_num(scores.float(), nan=float("-inf")).cpu()
    top = s == s.max(dim=1, keepdim=True).values
    share = (1.0 / top.sum(1)).tolist()
    y_true, y_pred, weight = [], [], []
    for i, j in top.nonzero().tolist():
        y_pred.append(j)
        y_true.append(j if j in true_classes[i] else true_classes[i][0])
        weight.append(share[i])
    if all(w == 1.0 for w in weight):
        weight = None  # exactly scikit-learn's unweighted numbers
    return classification_metrics(y_true, y_pred, class_names, sample_weight=weight)


def class_recall_at_k(scores: torch.Tensor, true_sets: list[set[int]], ks=(1, 5)) -> dict[str, float]:
    """R@K over all class prompts: the share of images with a true class among the K best; ties
    by expected rank (`retrieval_recall`)."""
    return {f"R@{k}": v for k, v in retrieval_recall(scores, true_sets, ks).items()}


def distractor_top1(scores: torch.Tensor, true_class: list[int], n_distractors: int = 9, seed: int = 0) -> float:
    """The seed's test: one correct class among n random distractors (fixed seed); the share of
    images whose correct class scores highest. Chance is 1/(n+1) (10% for 9 distractors).

    A tie at the top between the correct class and m - 1 distractors counts 1/m, its expected
    rank: the correct class is placed first, so argmax's first index made a collapsed model
    (all scores equal) win every draw and score 1.0 instead of chance."""
    rng = np.random.default_rng(seed)
    k = scores.shape[1]
    s = torch.nan_to_num(scores.float(), nan=float("-inf")).cpu()
    hits = []
    for i, c in enumerate(true_class):
        others = rng.choice([j for j in range(k) if j != c], size=min(n_distractors, k - 1), replace=False)
        rivals = s[i, others]
        hits.append(0.0 if (rivals > s[i, c]).any() else 1.0 / (1 + int((rivals == s[i, c]).sum())))
    return float(np.mean(hits)) if hits else float("nan")
