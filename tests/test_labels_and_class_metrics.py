"""Labelled data (seed 004): stratified split, oversampling, class-retrieval metrics."""
from collections import Counter

import numpy as np
import pytest
import torch

from metrics import class_recall_at_k, classification_metrics, distractor_top1
from Stage0.labels import oversample, parse_labels, stratified_split


def _long_tail(seed=0):
    rng = np.random.default_rng(seed)
    sizes = {"acne": 60, "eczema": 40, "psoriasis": 25, "melanoma": 9, "rosacea": 5, "vitiligo": 3, "keloid": 2,
             "lupus": 1}
    rows = []
    for c, n in sizes.items():
        for _ in range(n):
            extra = ["eczema"] if c == "psoriasis" and rng.random() < 0.3 else []
            rows.append([c, *extra])
    return rows


def test_parse_labels():
    assert parse_labels("acne; eczema ;") == ["acne", "eczema"] and parse_labels(None) == []


def test_stratified_split_keeps_every_class_with_3_rows_in_every_split(caplog):
    rows = _long_tail()
    with caplog.at_level("WARNING", logger="siglip_med"):
        split = stratified_split(rows, (0.8, 0.1, 0.1), seed=0)
    assert "fewer than 3 rows" in caplog.text and "keloid" in caplog.text
    counts = Counter(c for r in rows for c in r)
    for c, n in counts.items():
        present = {s for r, s in zip(rows, split) if c in r}
        if n >= 3:
            assert present == {"train", "val", "test"}, c
        else:
            assert present == {"train"}, c
    share = Counter(split)
    assert 0.7 < share["train"] / len(rows) < 0.9
    assert split == stratified_split(rows, (0.8, 0.1, 0.1), seed=0)  # deterministic by seed


def test_oversampling_reaches_the_threshold_in_train_only():
    rows = _long_tail()
    split = stratified_split(rows, seed=0)
    paths = [f"img_{i}.png" for i in range(len(rows))]
    train = [i for i, s in enumerate(split) if s == "train"]
    test = [i for i, s in enumerate(split) if s == "test"]
    sampled = oversample(train, rows, min_count=30, seed=0)
    counts = Counter(c for i in sampled for c in rows[i])
    assert all(counts[c] >= 30 for c in counts)
    assert set(sampled) == set(train)  # only train rows are repeated
    assert not {paths[i] for i in test} & {paths[i] for i in sampled}  # no test image in train
    assert Counter(c for i in train for c in rows[i])["acne"] == counts["acne"]  # common classes untouched


def test_metrics_equal_scikit_learn_on_a_fixed_example():
    from sklearn.metrics import f1_score, precision_score, recall_score
    y_true = [0, 0, 1, 1, 2, 2, 2, 3]
    y_pred = [0, 1, 1, 1, 2, 0, 2, 2]
    m = classification_metrics(y_true, y_pred, ["a", "b", "c", "d"])
    assert m["accuracy"] == pytest.approx(5 / 8)
    assert m["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, average="macro", zero_division=0))
    assert m["macro_precision"] == pytest.approx(precision_score(y_true, y_pred, average="macro", zero_division=0))
    assert m["macro_recall"] == pytest.approx(recall_score(y_true, y_pred, average="macro", zero_division=0))
    assert m["per_class"]["c"] == {"support": 3, "recall": pytest.approx(2 / 3), "f1": pytest.approx(2 / 3)}
    assert m["per_class"]["d"]["recall"] == 0.0


def test_class_recall_and_the_distractor_test():
    scores = torch.tensor([[0.9, 0.1, 0.0, 0.2], [0.1, 0.2, 0.8, 0.7], [0.3, 0.2, 0.1, 0.0]])
    r = class_recall_at_k(scores, [{0}, {3}, {3}], ks=(1, 2))
    assert r == {"R@1": pytest.approx(1 / 3), "R@2": pytest.approx(2 / 3)}
    assert distractor_top1(scores, [0, 3, 3], n_distractors=3) == pytest.approx(1 / 3)
    # a perfect scorer wins every draw; a random one wins about 1 in 10 with 9 distractors
    torch.manual_seed(0)
    k, n = 20, 2000
    truth = torch.randint(0, k, (n,))
    assert distractor_top1(torch.nn.functional.one_hot(truth, k).float(), truth.tolist()) == 1.0
    assert abs(distractor_top1(torch.rand(n, k), truth.tolist(), seed=1) - 0.1) < 0.03


def test_class_prompt_templates():
    """The seed's wording by default; one template for every class otherwise ({description}
    then needs every class described: an empty one would read "...: " or repeat the name)."""
    from Stage0.labels import class_texts
    classes = {"acne": {"description": "red papules"}, "keloid": {"description": ""}}
    assert class_texts(["acne", "keloid"], classes) == ["Clinical presentation of acne: red papules",
                                                        "A dermatological image showing keloid."]
    assert class_texts(["acne", "keloid"], classes, "Chest X-ray showing {condition}.") == [
        "Chest X-ray showing acne.", "Chest X-ray showing keloid."]
    with pytest.raises(ValueError, match=r"keloid.*\{condition\}"):
        class_texts(["acne", "keloid"], classes, "{condition}: {description}")
    for bad in ("Chest X-ray", "{finding}", "{condition"):
        with pytest.raises(ValueError, match="--class_prompt_template"):
            class_texts(["acne"], classes, bad)


def test_prompts_identical_after_tokenization_are_named():
    from Stage0.labels import colliding_prompts
    ids = torch.tensor([[5, 6, 1], [5, 6, 1], [5, 7, 1], [5, 6, 1]])
    assert colliding_prompts(["a", "b", "c", "d"], ids, torch.ones_like(ids)) == [["a", "b", "d"]]
    assert colliding_prompts(["a", "c"], ids[1:3], torch.ones(2, 3)) == []
