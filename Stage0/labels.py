"""Labelled data for the fine-grained recipe (seed 004): label parsing, a stratified split that
works for multi-label rows and rare classes, and oversampling of rare classes in train."""
from __future__ import annotations

import logging
from collections import Counter

import numpy as np

logger = logging.getLogger("siglip_med")


def parse_labels(value) -> list[str]:
    """One or several labels per row, `;`-separated; blanks dropped."""
    return [v.strip() for v in str(value or "").split(";") if v.strip()]


def stratified_split(label_sets: list[list[str]], fractions=(0.8, 0.1, 0.1), seed: int = 0) -> list[str]:
    """train / val / test per row, stratified over every label at once (iterative
    stratification, Sechidis et al. 2011, from `iterative-stratification`). Then every class with
    at least 3 rows is made present in all three splits, moving a row out of train where needed;
    a class with fewer stays in train (said in a warning: it cannot be evaluated)."""
    from iterstrat.ml_stratifiers import MultilabelStratifiedShuffleSplit
    classes = sorted({c for s in label_sets for c in s})
    index = {c: i for i, c in enumerate(classes)}
    y = np.zeros((len(label_sets), len(classes)), dtype=int)
    for r, s in enumerate(label_sets):
        for c in s:
            y[r, index[c]] = 1
    x = np.zeros((len(label_sets), 1))
    train_f, val_f, test_f = fractions
    split = np.array(["train"] * len(label_sets), dtype=object)
    counts = y.sum(0)
    rare = [c for c, n in zip(classes, counts) if n < 3]
    if rare:
        logger.warning("%d classes have fewer than 3 rows and stay in train (not evaluated): %s", len(rare),
                       ", ".join(rare[:10]) + (" ..." if len(rare) > 10 else ""))
    common = np.array([not any(counts[index[c]] < 3 for c in s) for s in label_sets])
    idx = np.flatnonzero(common)
    if len(idx) >= 3 and val_f + test_f > 0:
        first = MultilabelStratifiedShuffleSplit(n_splits=1, test_size=val_f + test_f, random_state=seed)
        _, held = next(first.split(x[idx], y[idx]))
        held = idx[held]
        second = MultilabelStratifiedShuffleSplit(n_splits=1, test_size=test_f / (val_f + test_f), random_state=seed)
        v, t = next(second.split(x[held], y[held]))
        split[held[v]], split[held[t]] = "val", "test"
    # guarantee: each class with >= 3 rows in every split
    for c in classes:
        if counts[index[c]] < 3:
            continue
        for target in ("val", "test"):
            rows = np.flatnonzero(y[:, index[c]] == 1)
            if not (split[rows] == target).any():
                donors = [r for r in rows if split[r] == "train" and common[r]]
                if len([r for r in rows if split[r] == "train"]) > 1 and donors:
                    split[donors[-1]] = target
    return list(split)


def oversample(train_rows: list[int], label_sets: list[list[str]], min_count: int = 30, seed: int = 0) -> list[int]:
    """Train rows with rows of classes below `min_count` repeated (at random) until each such
    class has `min_count` rows. Apply to the training split only, after splitting."""
    rng = np.random.default_rng(seed)
    counts = Counter(c for r in train_rows for c in label_sets[r])
    out = list(train_rows)
    for c in sorted(counts):
        if counts[c] >= min_count:
            continue
        members = [r for r in train_rows if c in label_sets[r]]
        extra = rng.choice(members, size=min_count - counts[c], replace=True).tolist()
        out += extra
        for r in extra:
            for other in label_sets[r]:
                counts[other] += 1
    return out
