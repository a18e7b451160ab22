"""Labelled data for the fine-grained recipe (seed 004): label parsing, a stratified split that
works for multi-label rows and rare classes, oversampling of rare classes in train, and the
class prompts (their template, the checks on them, and the record an exported model keeps)."""
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


# The seed's wording, kept as the default: a described class reads "Clinical presentation of
# {condition}: {description}", an undescribed one "A dermatological image showing {condition}.".
DESCRIBED_TEMPLATE = "Clinical presentation of {condition}: {description}"
NAME_TEMPLATE = "A dermatological image showing {condition}."
PLACEHOLDERS = ("condition", "description")
PROMPTS_FILE = "class_prompts.json"  # in every exported model folder of a labelled run


def check_template(template: str | None) -> set[str]:
    """The placeholders of a --class_prompt_template: {condition} and/or {description} and
    nothing else (a template without either gives every class the same text)."""
    if template is None:
        return set()
    import string
    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as e:
        raise ValueError(f"--class_prompt_template {template!r}: {e} (write a literal brace as {{{{ or }}}})") from None
    bad = sorted(fields - set(PLACEHOLDERS))
    if bad or not fields:
        raise ValueError(f"--class_prompt_template {template!r}: " + (
            f"unknown placeholder {{{bad[0]}}}" if bad else "no placeholder, so every class would read the same") +
            "; use {condition} and/or {description}, e.g. \"Chest X-ray showing {condition}.\"")
    return fields


def class_text(condition: str, classes: dict, template: str | None = None) -> str:
    """The text of one class, for training captions and retrieval prompts alike. Without a
    template, the seed's: its description template when the classes file describes the class,
    else its name template. A template is one wording for every class."""
    desc = classes.get(condition, {}).get("description", "")
    if template is None:
        template = DESCRIBED_TEMPLATE if desc else NAME_TEMPLATE
    return template.format(condition=condition, description=desc)


def class_texts(names, classes: dict, template: str | None = None) -> list[str]:
    """class_text for each name, after checking the template. A template that uses
    {description} needs every class described: an empty one would leave "...: " or a bare
    prefix, which is no text of that class."""
    if "description" in check_template(template):
        bare = [c for c in names if not classes.get(c, {}).get("description")]
        if bare:
            raise ValueError(f"--class_prompt_template {template!r} uses {{description}}, but the classes file "
                             f"has no description for: {', '.join(bare)}; add their descriptions, or use a template "
                             "without {description}, e.g. \"{condition}\"")
    return [class_text(c, classes, template) for c in names]


def row_text(labels: list[str], classes: dict, template: str | None = None) -> str:
    return " ".join(class_text(c, classes, template) for c in labels)


def colliding_prompts(names, input_ids, attention_mask) -> list[list[str]]:
    """Groups of classes whose prompts are the same token ids (and mask) once tokenized and
    truncated: a long shared prefix on a short text tower leaves one text for all of them."""
    groups: dict = {}
    for name, ids, mask in zip(names, input_ids.tolist(), attention_mask.tolist()):
        groups.setdefault((tuple(ids), tuple(mask)), []).append(name)
    return [g for g in groups.values() if len(g) > 1]


def collision_error(groups, max_len: int) -> str:
    shown = "; ".join(", ".join(g) for g in groups)
    return (f"error: class prompts identical once tokenized and truncated to the run's text length ({max_len} "
            f"tokens): {shown} (each group would train on one text and score chance); use a shorter "
            "--class_prompt_template, e.g. \"{condition}\", or a text tower with a longer limit")


def labels_not_in(classes: dict, label_sets) -> dict[str, int]:
    """Labels the classes file does not list, with their row counts (row order of first sight)."""
    out: dict[str, int] = {}
    for s in label_sets:
        for c in dict.fromkeys(s):
            if c not in classes:
                out[c] = out.get(c, 0) + 1
    return out


def check_unknown_labels(label_sets, classes: dict, classes_file, mode: str = "warn") -> None:
    """Labels missing from --classes_file become classes of their own (K grows, no
    description, no ICD code): one warning listing them, or with mode "error" a refusal."""
    if not classes_file:  # without a classes file every label is a class by design
        return
    unknown = labels_not_in(classes, label_sets)
    if not unknown:
        return
    listed = ", ".join(f"{c} ({n} row{'s' if n != 1 else ''})" for c, n in unknown.items())
    if mode == "error":
        raise ValueError(f"{len(unknown)} labels are not in {classes_file}: {listed}; add them to the classes file, "
                         "or fix the labels (--unknown_labels warn keeps them as classes of their own)")
    logger.warning("%d labels are not in %s and become classes of their own: %s (--unknown_labels error refuses)",
                   len(unknown), classes_file, listed)


def prompt_record(template: str | None, names, classes: dict) -> dict:
    """What an exported model folder keeps of its class prompts (PROMPTS_FILE); template null
    is the seed's default wording."""
    return {"template": template,
            "prompts": dict(zip(names, class_texts(names, classes, template))),
            "classes": {c: {k: classes.get(c, {}).get(k, "") for k in ("description", "icd10")} for c in names}}


def write_prompt_record(out_dir, record: dict) -> None:
    import json
    import os
    path = Path(out_dir) / PROMPTS_FILE
    tmp = path.with_name(f".{PROMPTS_FILE}.tmp")
    tmp.write_text(json.dumps(record, indent=2))
    os.replace(tmp, path)  # never through a hard link into another export's copy


def read_prompt_record(model_dir) -> dict | None:
    import json
    path = Path(model_dir) / PROMPTS_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def resolve_prompts(model_dir, template_flag: str | None, classes: dict) -> tuple[str | None, dict]:
    """(template, classes) for evaluation and inference: the model's recorded training template
    unless the flag overrides it (with a warning when it differs), and the recorded classes
    when no classes file was given."""
    record = read_prompt_record(model_dir)
    if record is None:
        return template_flag, classes
    if not classes:
        classes = record.get("classes", {})
    trained = record.get("template")
    if template_flag is None:
        return trained, classes
    if template_flag != trained:
        logger.warning("--class_prompt_template %r differs from training's %s (%s): these prompts are not the "
                       "ones the model was trained on", template_flag,
                       repr(trained) if trained is not None else "default (the seed's wording)",
                       Path(model_dir) / PROMPTS_FILE)
    return template_flag, classes


def prepare_labelled_csv(path, image_root, image_key, label_column, classes_file, out_csv, *, split_column=None,
                         fractions=(0.8, 0.1, 0.1), oversample_min: int = 0, seed: int = 0, write: bool = True,
                         problems: list | None = None, template: str | None = None,
                         unknown_labels: str = "warn"):
    """The labelled data as a training CSV: absolute image path, caption (the rows' class texts),
    labels, split. Rows without labels are dropped (counted in the log). Without a split column
    the rows are split by iterative stratification; rare classes are oversampled in train only.
    Returns (csv path, class names, classes). Every process computes the same result; only the
    one with `write` writes the file. `problems`: a list that collects rows whose image is missing
    (left out; data_check reports them against this file), instead of stopping at the first.
    `template`: the class prompt template (None: the seed's); `unknown_labels`: labels missing from the
    classes file are warned about ("warn") or refused ("error")."""
    import csv

    from data_rows import read_rows
    rows = read_rows(path, image_root, (image_key,), image_key=image_key, problems=problems)
    labelled = [r for r in rows if parse_labels(r.get(label_column))]
    if len(labelled) < len(rows):
        logger.info("%s: %d of %d rows have no %r and are left out", path, len(rows) - len(labelled), len(rows),
                    label_column)
    if not labelled:
        raise ValueError(f"{path}: no row has a label in column {label_column!r}")
    label_sets = [parse_labels(r[label_column]) for r in labelled]
    classes = read_classes(classes_file) if classes_file else {}
    check_unknown_labels(label_sets, classes, classes_file, unknown_labels)
    names = sorted(set(classes) | {c for s in label_sets for c in s})
    class_texts(names, classes, template)  # a bad template stops here, before any file is written
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
            w.writerow([labelled[i]["image_path"], row_text(label_sets[i], classes, template), ";".join(label_sets[i]),
                        split[i]])
    return out_csv, names, classes
