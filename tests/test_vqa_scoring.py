"""The VQA scoring protocol on planted predictions (no model): closed verdicts are whole
words, closed non-yes/no answers must match, open recall is LLaVA-Med's on whole words, and
--predictions_json refuses files that do not fit the test rows."""
import json

import pytest

import cli
from Stage2.evaluate import main, score


def _rows(*triples):
    return [{"row": i, "image": f"{i}.png", "problem": q, "normal_caption": a, "question_type": t}
            for i, (q, a, t) in enumerate(triples)]


def test_planted_predictions_score_as_the_protocol_says():
    rows = _rows(("Is there an effusion?", "no", "CLOSED"), ("Is there an effusion?", "no", "closed"),
                 ("Is the heart enlarged?", "yes", "CLOSED"), ("Which side?", "left", "CLOSED"),
                 ("Which side?", "left", "CLOSED"), ("What is seen?", "pleural effusion", "OPEN"),
                 ("What is seen?", "pneumothorax", "OPEN"))
    preds = ["Not sure.", "No.", "Yes, there is.", "right", "Left.", "a large pleural effusion", "no findings"]
    summary, records = score(rows, preds)
    assert [r["correct"] for r in records[:5]] == [False, True, True, False, True]
    # "Not sure." holds no verdict: a substring scorer would find "no" in it and count it right
    assert records[5]["recall"] == 1.0 and records[6]["recall"] == 0.0
    assert summary["closed"]["n"] == 5 and summary["closed"]["accuracy"] == pytest.approx(3 / 5)
    assert summary["open"]["recall"] == pytest.approx(0.5)
    assert summary["closed"]["answered"] == pytest.approx(2 / 3)  # of the yes/no questions only


def _write(path, value):
    path.write_text(json.dumps(value))
    return path


def test_predictions_json_scores_a_list_in_row_order_and_refuses_a_mismatch(tmp_path, capsys):
    test = _write(tmp_path / "test.json", [{"image": "a.png", "problem": "Is there X?", "normal_caption": "yes"},
                                           {"image": "b.png", "problem": "Which side?", "normal_caption": "left",
                                            "question_type": "CLOSED"}])
    summary = main(["--predictions_json", str(_write(tmp_path / "p.json", ["yes", {"prediction": "left"}])),
                    "--test_json", str(test)])
    assert summary["closed"]["accuracy"] == 1.0 and (tmp_path / "rescored_test.json").exists()
    assert "closed" in capsys.readouterr().out
    for bad, words in [(["yes"], "1 predictions for 2 test rows"), ([1, 2], "item 0 is int"),
                       ({"x": 1}, "expected a JSON list of predictions")]:
        _write(tmp_path / "bad.json", bad)
        with pytest.raises(SystemExit):
            cli.run(main, ["--predictions_json", str(tmp_path / "bad.json"), "--test_json", str(test),
                           "--output_json", str(tmp_path / "o.json"), "--force"])
        err = capsys.readouterr().err
        assert words in err and len(err.strip().splitlines()) == 1, err
    with pytest.raises(SystemExit):
        main(["--predictions_json", str(tmp_path / "p.json"), "--model_path", "m", "--test_json", str(test)])
    assert "without a model" in capsys.readouterr().err


def test_report_generation_metrics_on_known_pairs():
    from metrics import report_metrics
    # "heart is mildly enlarged" against "the heart is enlarged": 3 of the 4 words match, equal
    # lengths (no brevity penalty), so BLEU-1 = 3/4; the longest common subsequence "heart is
    # enlarged" gives ROUGE-L precision = recall = 3/4
    m = report_metrics(["Heart is mildly enlarged."], ["The heart is enlarged."])
    assert m["BLEU-1"] == pytest.approx(0.75) and m["ROUGE-L"] == pytest.approx(0.75)
    assert m["BLEU-4"] == 0.0  # no 3-gram in common
    same = report_metrics(["No acute cardiopulmonary process."], ["No acute cardiopulmonary process."])
    assert same["BLEU-4"] == pytest.approx(1.0) and same["ROUGE-L"] == pytest.approx(1.0)
    assert m["implementations"]["BLEU"].startswith("nltk ") and m["implementations"]["ROUGE-L"].startswith("rouge-score")
    assert (m["METEOR"] is None) == m["implementations"]["METEOR"].startswith("unavailable: NLTK's WordNet")


def test_report_rows_are_scored_with_the_report_metrics(tmp_path, capsys):
    rows = _rows(("Describe the findings.", "The heart is enlarged.", "report"),
                 ("Is there an effusion?", "no", "closed"))
    summary, _ = score(rows, ["Heart is mildly enlarged.", "no"])
    assert summary["report"]["BLEU-1"] == pytest.approx(0.75) and summary["report"]["n"] == 1
    assert summary["closed"]["accuracy"] == 1.0
    from Stage2.evaluate import format_table
    assert "report: BLEU-1 0.750" in format_table(summary)
