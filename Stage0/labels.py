"""Labelled data for the fine-grained recipe (seed 004): label parsing, a stratified split that
works for multi-label rows and rare classes, and oversampling of rare classes in train."""
from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

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


# ---------------------------------------------------------------- classes and texts

def read_classes(path) -> dict[str, dict]:
    """A classes CSV `condition,description,icd10` -> {condition: {"description", "icd10"}}."""
    import csv
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        if "condition" not in (reader.fieldnames or []):
            raise ValueError(f"{path}: no 'condition' column (columns: {reader.fieldnames})")
        return {r["condition"].strip(): {"description": (r.get("description") or "").strip(),
                                         "icd10": (r.get("icd10") or "").strip()}
                for r in reader if (r.get("condition") or "").strip()}


def class_text(condition: str, classes: dict) -> str:
    """The text of one class, for training captions and retrieval prompts alike: the seed's
    description template when the classes file describes it, else its name template."""
    desc = classes.get(condition, {}).get("description", "")
    return f"Clinical presentation of {condition}: {desc}" if desc else f"A dermatological image showing {condition}."


def row_text(labels: list[str], classes: dict) -> str:
    return " ".join(class_text(c, classes) for c in labels)


def prepare_labelled_csv(path, image_root, image_key, label_column, classes_file, out_csv, *, split_column=None,
                         fractions=(0.8, 0.1, 0.1), oversample_min: int = 0, seed: int = 0, write: bool = True,
                         problems: list | None = None):
    """The labelled data as a training CSV: absolute image path, caption (the rows' class texts),
    labels, split. Rows without labels are dropped (counted in the log). Without a split column
    the rows are split by iterative stratification; rare classes are oversampled in train only.
    Returns (csv path, class names, classes). Every process computes the same result; only the
    one with `write` writes the file. `problems`: a list that collects rows whose image is missing
    (left out; data_check reports them against this file), instead of stopping at the first."""
    import csv

    from image_loader import read_rows
    rows = read_rows(path, image_root, (image_key,), image_key=image_key, problems=problems)
    labelled = [r for r in rows if parse_labels(r.get(label_column))]
    if len(labelled) < len(rows):
        logger.info("%s: %d of %d rows have no %r and are left out", path, len(rows) - len(labelled), len(rows),
                    label_column)
    if not labelled:
        raise ValueError(f"{path}: no row has a label in column {label_column!r}")
    label_sets = [parse_labels(r[label_column]) for r in labelled]
    classes = read_classes(classes_file) if classes_file else {}
    names = sorted(set(classes) | {c for s in label_sets for c in s})
    if split_column and split_column in labelled[0]:
        split = [str(r[split_column]).strip() for r in labelled]
    else:
        split = stratified_split(label_sets, fractions, seed=seed)
    train = [i for i, s in enumerate(split) if s == "train"]
    leaked = {labelled[i]["image_path"] for i in train} & {labelled[i]["image_path"]
                                                          for i, s in enumerate(split) if s == "test"}
    if leaked:
        raise ValueError(f"{path}: {len(leaked)} images are in both train and test (e.g. {sorted(leaked)[0]}); "
                         "a test image must never be trained on")
    order = oversample(train, label_sets, oversample_min, seed=seed) if oversample_min else train
    order += [i for i, s in enumerate(split) if s != "train"]
    if not write:
        return out_csv, names, classes
    Path(out_csv).parent.mkdir(parents=True, exist_ok=True)
    with open(out_csv, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["img_path", "caption", "labels", "split"])
        for i in order:
            w.writerow([labelled[i]["image_path"], row_text(label_sets[i], classes), ";".join(label_sets[i]), split[i]])
    return out_csv, names, classes
