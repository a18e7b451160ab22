"""Ranking metrics under tied scores: a tie is an expected rank, never a win by position.

A collapsed model (every text embedding the same) ties every score; sigmoid probabilities
saturated at 1.0 tie the confident classes. Such scores must give chance, not whatever
the candidate order or argmax's first index happens to favour."""
from math import comb
from types import SimpleNamespace

import pytest
import torch

from metrics import class_recall_at_k, classification_metrics, distractor_top1, image_text_retrieval, retrieval_recall


def top1_classification(*args):
    from metrics import top1_classification
    return top1_classification(*args)


def test_collapsed_scores_give_chance():
    k, n = 20, 50
    flat = torch.full((n, k), 0.3)
    truth = [i % k for i in range(n)]
    assert distractor_top1(flat, truth, n_distractors=9) == pytest.approx(0.1)
    assert class_recall_at_k(flat, [{c} for c in truth], ks=(1, 5)) == {"R@1": pytest.approx(1 / k),
                                                                         "R@5": pytest.approx(5 / k)}
    # two correct classes among 20: R@1 = 2/20, R@5 = 1 - C(18, 5) / C(20, 5)
    r = retrieval_recall(flat, [{c, (c + 1) % k} for c in truth], ks=(1, 5))
    assert r == {1: pytest.approx(2 / k), 5: pytest.approx(1 - comb(18, 5) / comb(20, 5))}
    m = top1_classification(flat, [[0]] * n, [f"c{j}" for j in range(k)])
    assert m["accuracy"] == pytest.approx(1 / k)  # argmax alone says 1.0: class 0 is the first index


def test_collapsed_embeddings_give_chance_retrieval():
    img, txt = torch.eye(4)[[0] * 12], torch.eye(4)[[0] * 4]  # every similarity is exactly 1
    caption_ids = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3])
    m = image_text_retrieval(img, txt, caption_ids, ks=(1, 5))
    assert m["i2t_R@1"] == pytest.approx(1 / 4) and m["i2t_R@5"] == 1.0
    # each caption has 3 of the 12 images
    assert m["t2i_R@1"] == pytest.approx(3 / 12)
    assert m["t2i_R@5"] == pytest.approx(1 - comb(9, 5) / comb(12, 5))


PLANTED = torch.tensor([[0.9, 0.5, 0.5, 0.5, 0.1, 0.0],   # one above, then a 3-way tie holding the target
                        [0.2, 0.7, 0.7, 0.7, 0.7, 0.1],   # a 4-way tie at the top holding 2 targets
                        [0.3, 0.1, 0.8, 0.2, 0.4, 0.6]])  # no tie: the target (4) is third


def test_planted_ranks_give_the_expected_values():
    r = class_recall_at_k(PLANTED, [{1}, {2, 3}, {4}], ks=(1, 2, 3, 4))
    # row 0: 0, 1/3, 2/3, 1; row 1: 1 - C(2,1)/C(4,1) = 1/2, 1 - C(2,2)/C(4,2) = 5/6, 1, 1; row 2: 0, 0, 1, 1
    assert r == {"R@1": pytest.approx(1 / 6), "R@2": pytest.approx(7 / 18), "R@3": pytest.approx(8 / 9),
                 "R@4": pytest.approx(1.0)}
    # with every other class a distractor there is no draw: 0, 1/4 (4-way tie), 1
    assert distractor_top1(PLANTED, [1, 2, 2], n_distractors=5) == pytest.approx(5 / 12)
    assert class_recall_at_k(PLANTED, [{1}, {2}, {2}], ks=(1,))["R@1"] == pytest.approx(5 / 12)


def test_planted_top1_classification():
    names = [f"c{j}" for j in range(6)]
    m = top1_classification(PLANTED, [[0], [2, 3], [4]], names)
    # row 0: c0 wins; row 1: c1..c4 tie, c2 or c3 correct, so half of it; row 2: c2 wins, wrong
    assert m["accuracy"] == pytest.approx((1 + 0.5 + 0) / 3)
    # the expected confusion matrix: row 1 is a quarter each of (c2, c2), (c3, c3), (c2, c1), (c2, c4)
    assert m["per_class"]["c2"]["support"] == pytest.approx(0.75)
    assert m["per_class"]["c2"]["recall"] == pytest.approx(0.25 / 0.75)


def test_untied_scores_are_unchanged():
    torch.manual_seed(0)
    scores = torch.rand(40, 7)
    truth = torch.randint(0, 7, (40,)).tolist()
    order = scores.argsort(dim=1, descending=True)
    for k in (1, 3):
        expected = sum(t in order[i, :k].tolist() for i, t in enumerate(truth)) / 40
        assert class_recall_at_k(scores, [{t} for t in truth], ks=(k,))[f"R@{k}"] == pytest.approx(expected)
    names = [f"c{j}" for j in range(7)]
    pred = scores.argmax(1).tolist()
    assert top1_classification(scores, [[t] for t in truth], names) == classification_metrics(truth, pred, names)
    # the distractor test as it was: the correct class strictly above its drawn distractors
    import numpy as np
    rng = np.random.default_rng(0)
    wins = []
    for i, c in enumerate(truth):
        others = rng.choice([j for j in range(7) if j != c], size=6, replace=False)
        wins.append(bool((scores[i, c] > scores[i, others]).all()))
    assert distractor_top1(scores, truth, n_distractors=6) == pytest.approx(np.mean(wins))


def test_class_evaluation_of_a_collapsed_model_is_chance(tmp_path, monkeypatch):
    """Stage0/evaluate_stage0.py's labelled path: accuracy, R@K and the distractor test of a model
    whose every class prompt scores the same."""
    import Stage0.evaluate_stage0 as ev
    import Stage0.inference_stage0 as inf
    k, n = 10, 30
    data = tmp_path / "derm.csv"
    data.write_text("img_path,labels\n" + "".join(f"img{i}.png,c0\n" for i in range(n)))
    model = SimpleNamespace(to=lambda device: SimpleNamespace(eval=lambda: None))
    monkeypatch.setattr(ev, "load_model", lambda path: (model, None, None))
    monkeypatch.setattr("data_rows.read_rows", lambda *a, **kw: [{"labels": "c0"} for _ in range(n)])
    monkeypatch.setattr(inf, "ImageFiles", lambda rows, processor, source, **kw: list(range(len(rows))))
    monkeypatch.setattr(inf, "score", lambda *a: torch.full((n, k), 1.0))  # sigmoid saturated everywhere
    classes = tmp_path / "classes.csv"
    classes.write_text("condition,description,icd10\n" + "".join(f"c{j},,\n" for j in range(k)))
    args = SimpleNamespace(image_key=None, test_json=str(data), image_root="", split=None, label_column="labels",
                           classes_file=str(classes), batch_size=8, device="cpu", seed=0)
    m = ev.evaluate_classes("unused", args)
    assert m["accuracy"] == pytest.approx(1 / k)
    assert m["R@1"] == pytest.approx(1 / k) and m["R@5"] == pytest.approx(5 / k)
    assert m["distractor_top1"] == pytest.approx(1 / 10)
