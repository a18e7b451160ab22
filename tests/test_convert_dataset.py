"""scripts/data/convert_dataset.py on small copies of each release's layout, written here with
the releases' own file, folder and key names, including rows the converter must skip."""
import json

import pytest
from PIL import Image

import cli
from data_check import check_rows
from scripts.data.convert_dataset import main


def _image(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (24, 20), 128).save(path)


def _vqa_rad(root):
    images = root / "VQA_RAD Image Folder"
    for name in ("synpic54610.jpg", "synpic29265.jpg", "synpic42202.jpg"):
        _image(images / name)

    def q(qid, phrase, image, question, answer, kind):
        return {"qid": qid, "phrase_type": phrase, "qid_linked_id": f"{qid:05d}", "image_case_url": "https://medpix",
                "image_name": image, "image_organ": "HEAD", "evaluation": "evaluated", "question": question,
                "question_rephrase": "NULL", "question_relation": "NULL", "question_frame": "NULL",
                "question_type": "PRES", "answer": answer, "answer_type": kind}
    rows = [q(1, "freeform", "synpic54610.jpg", "Are regions of the brain infarcted?", "Yes", "CLOSED"),
            q(2, "para", "synpic54610.jpg", "Which side is the lesion on?", "Left", "CLOSED"),
            q(3, "freeform", "synpic29265.jpg", "How many lesions are there?", 2, "OPEN"),
            q(4, "test_freeform", "synpic42202.jpg", "What is  the abnormality?", " ring enhancing lesion ", "OPEN"),
            q(5, "test_para", "synpic42202.jpg", "Is this an MRI?", "no", "CLOSED"),
            q(6, "freeform", "synpic00000.jpg", "Is there a mass?", "yes", "CLOSED"),  # image not in the folder
            q(7, "test_freeform", "synpic42202.jpg", "Where is it?", "", "OPEN")]  # no answer
    (root / "VQA_RAD Dataset Public.json").write_text(json.dumps(rows))


def test_vqa_rad_splits_on_phrase_type_and_keeps_answer_types(tmp_path, capsys):
    _vqa_rad(tmp_path / "VQA_RAD")
    written = main(["vqa_rad", "--input", str(tmp_path / "VQA_RAD"), "--out_dir", str(tmp_path / "out")])
    train, test = (json.loads(written[s].read_text()) for s in ("train", "test"))
    assert [r["qid"] for r in train] == [1, 2, 3] and [r["qid"] for r in test] == [4, 5]
    assert test[0] == {"image": "synpic42202.jpg", "problem": "What is the abnormality?",
                       "normal_caption": "ring enhancing lesion", "question_type": "open", "qid": 4, "organ": "HEAD"}
    assert train[2]["normal_caption"] == "2" and [r["question_type"] for r in train] == ["closed", "closed", "open"]
    out = capsys.readouterr().out
    assert "train:      3 rows (2 closed, 1 open)" in out and "test:      2 rows (1 closed, 1 open)" in out
    assert "skipped 2 rows" in out and "train 6: no image 'synpic00000.jpg'" in out and "test 7: an empty answer" in out
    image_root = tmp_path / "VQA_RAD" / "VQA_RAD Image Folder"
    assert f"--image_root {image_root}" in out
    for path in written.values():  # Stage2 reads every converted row
        rows, bad = check_rows(path, image_root, ("image", "problem", "normal_caption"), image_key="image",
                               on_bad_sample="error")
        assert not bad and len(rows) == len(json.loads(path.read_text()))


def test_slake_keeps_english_questions_per_split(tmp_path, capsys):
    root = tmp_path / "Slake1.0"
    for i in (1, 2):
        _image(root / "imgs" / f"xmlab{i}" / "source.jpg")

    def q(qid, image, question, answer, kind, lang="en"):
        return {"img_id": int(image[5]), "img_name": image, "question": question, "answer": answer, "q_lang": lang,
                "location": "Lung", "modality": "CT", "answer_type": kind, "base_type": "vqa",
                "content_type": "Organ", "triple": ["vhead", "_", "_"], "qid": qid}
    splits = {"train.json": [q(1, "xmlab1/source.jpg", "Does the picture contain lung?", "Yes", "CLOSED"),
                             q(2, "xmlab1/source.jpg", "图片中包含肺吗?", "是", "CLOSED", "zh")],
              "validate.json": [q(3, "xmlab2/source.jpg", "What modality is used?", "CT", "OPEN")],
              "test.json": [q(4, "xmlab2/source.jpg", "Which organ is abnormal?", "Left Lung", "OPEN"),
                            q(5, "xmlab2/source.jpg", "这是什么模态?", "CT", "OPEN", "zh")]}
    for name, rows in splits.items():
        (root / name).write_text(json.dumps(rows, ensure_ascii=False))
    written = main(["slake", "--input", str(root), "--out_dir", str(tmp_path / "out")])
    rows = {s: json.loads(p.read_text()) for s, p in written.items()}
    assert {s: [r["qid"] for r in v] for s, v in rows.items()} == {"train": [1], "val": [3], "test": [4]}
    assert rows["test"][0] == {"image": "xmlab2/source.jpg", "problem": "Which organ is abnormal?",
                               "normal_caption": "Left Lung", "question_type": "open", "qid": 4, "modality": "CT",
                               "location": "Lung"}
    assert "left out 2 rows: not English (q_lang 'zh')" in capsys.readouterr().out


def test_a_folder_that_is_not_the_release_is_refused_in_one_line(tmp_path, capsys, monkeypatch):
    (tmp_path / "VQA_RAD Dataset Public.json").write_text("[]")
    for fmt, words in [("vqa_rad", "not a VQA-RAD release: no 'VQA_RAD Image Folder' there"),
                       ("slake", "not a SLAKE release: no 'train.json', 'validate.json', 'test.json', 'imgs'")]:
        with pytest.raises(SystemExit):
            cli.run(main, [fmt, "--input", str(tmp_path), "--out_dir", str(tmp_path / "out")])
        err = capsys.readouterr().err
        assert words in err and len(err.strip().splitlines()) == 1, err
    _vqa_rad(tmp_path / "again")
    monkeypatch.setenv("HOME", str(tmp_path))
    main(["vqa_rad", "--input", "~/again", "--out_dir", "~/out2"])  # as a shell leaves a quoted ~
    assert (tmp_path / "out2" / "vqa_rad_train.json").is_file()
    with pytest.raises(SystemExit):  # a second run does not replace the files without --force
        cli.run(main, ["vqa_rad", "--input", str(tmp_path / "again"), "--out_dir", str(tmp_path / "out2")])
    assert "--force" in capsys.readouterr().err


def _gz_csv(path, header, rows):
    import csv
    import gzip
    with gzip.open(path, "wt", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


REPORT = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___F with cough

 FINDINGS:
 
 The heart is mildly enlarged.  Small left pleural
 effusion.

 IMPRESSION:
 
 Cardiomegaly and small left effusion.
"""


def test_mimic_cxr_frontal_images_with_report_sections_and_chexpert_labels(tmp_path, capsys):
    from scripts.data.convert_dataset import CHEXPERT_LABELS
    root, reports = tmp_path / "mimic-cxr-jpg" / "2.0.0", tmp_path / "mimic-cxr-reports"
    images = [("d1", "10000032", "50414267", "train", "PA"), ("d2", "10000032", "50414267", "train", "LATERAL"),
              ("d3", "10000764", "57375967", "validate", "AP"), ("d4", "10000898", "50771383", "test", "PA"),
              ("d5", "10001122", "54000000", "test", "PA")]  # d5's report has an impression only
    for dicom, subject, study, _, _ in images:
        _image(root / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}" / f"{dicom}.jpg")
        report = REPORT if study != "54000000" else "IMPRESSION: No acute process."
        path = reports / "files" / f"p{subject[:2]}" / f"p{subject}" / f"s{study}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(report)
    _gz_csv(root / "mimic-cxr-2.0.0-split.csv.gz", ["dicom_id", "study_id", "subject_id", "split"],
            [(d, st, su, sp) for d, su, st, sp, _ in images])
    _gz_csv(root / "mimic-cxr-2.0.0-metadata.csv.gz", ["dicom_id", "subject_id", "study_id", "ViewPosition", "Rows"],
            [(d, su, st, v, 3056) for d, su, st, _, v in images])
    chexpert = {"50414267": {"Cardiomegaly": "1.0", "Pleural Effusion": "-1.0", "Edema": "0.0"},
                "57375967": {"No Finding": "1.0"}, "50771383": {"Pneumothorax": "1.0"}, "54000000": {}}
    _gz_csv(root / "mimic-cxr-2.0.0-chexpert.csv.gz", ["subject_id", "study_id", *CHEXPERT_LABELS],
            [("1", st, *(labels.get(n, "") for n in CHEXPERT_LABELS)) for st, labels in chexpert.items()])

    written = main(["mimic_cxr", "--input", str(root), "--reports", str(reports), "--out_dir", str(tmp_path / "out")])
    rows = {s: json.loads(p.read_text()) for s, p in written.items()}
    assert {s: len(v) for s, v in rows.items()} == {"train": 1, "report_train": 1, "val": 1, "report_val": 1,
                                                   "test": 1, "report_test": 1}
    train = rows["train"][0]
    assert train["image"] == "files/p10/p10000032/s50414267/d1.jpg" and train["view"] == "PA"
    assert train["caption"] == "The heart is mildly enlarged. Small left pleural effusion."
    assert {k for k, v in train["labels"].items() if v} == {"Cardiomegaly"}  # -1 (uncertain) is negative
    assert rows["report_test"][0] == {"image": "files/p10/p10000898/s50771383/d4.jpg",
                                      "problem": "Describe the findings.",
                                      "normal_caption": "The heart is mildly enlarged. Small left pleural effusion.",
                                      "question_type": "report", "study_id": "50771383"}
    out = capsys.readouterr().out
    assert "left out 1 rows: not frontal (ViewPosition LATERAL)" in out
    assert "test d5: no FINDINGS section in its report" in out and f"--image_root {root}" in out
    findings = json.loads((tmp_path / "out" / "chexpert_findings.json").read_text())
    assert {f["name"] for f in findings} == set(CHEXPERT_LABELS) - {"No Finding"}

    both = main(["mimic_cxr", "--input", str(root), "--reports", str(reports), "--out_dir", str(tmp_path / "both"),
                 "--section", "both", "--uncertain", "positive"])
    first = json.loads(both["train"].read_text())[0]
    assert first["caption"].endswith("Cardiomegaly and small left effusion.")
    assert {k for k, v in first["labels"].items() if v} == {"Cardiomegaly", "Pleural Effusion"}
    assert len(json.loads(both["test"].read_text())) == 2  # d5's impression is a caption now
    rows, bad = check_rows(both["train"], root, ("image", "caption"), image_key="image", on_bad_sample="error")
    assert not bad and len(rows) == 1


def test_chexpert_labelled_csv_and_the_5x200_list(tmp_path, capsys):
    import csv

    from scripts.data.convert_dataset import CHEXPERT_LABELS, FIVE_BY_200
    release = tmp_path / "CheXpert-v1.0-small"
    header = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *CHEXPERT_LABELS]

    def row(path, view, **labels):
        _image(tmp_path / path)
        return [path, "Female", 68, view, "AP" if view == "Frontal" else "", *(labels.get(n.replace(" ", "_"), "")
                                                                              for n in CHEXPERT_LABELS)]
    for name, rows in {"train.csv": [row("CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg", "Frontal",
                                         Cardiomegaly="1.0", Edema="-1.0", Pleural_Effusion="0.0"),
                                     row("CheXpert-v1.0-small/train/patient00001/study1/view2_lateral.jpg", "Lateral",
                                         Cardiomegaly="1.0")],
                       "valid.csv": [row("CheXpert-v1.0-small/valid/patient64541/study1/view1_frontal.jpg", "Frontal",
                                         No_Finding="1.0")]}.items():
        release.mkdir(exist_ok=True)
        with (release / name).open("w", newline="") as f:
            csv.writer(f).writerows([header, *rows])
    five = tmp_path / "chexpert_5x200.csv"
    with five.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Path", *FIVE_BY_200])
        w.writerow(["CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg", 0, 1, 0, 0, 0])
        w.writerow(["CheXpert-v1.0-small/valid/patient64541/study1/view1_frontal.jpg", 1, 0, 0, 1, 0])  # two: skipped
    written = main(["chexpert", "--input", str(release), "--out_dir", str(tmp_path / "out"), "--five_by_200", str(five)])
    table = list(csv.DictReader(written["chexpert"].open()))
    assert table == [{"img_path": "CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg",
                      "labels": "Cardiomegaly", "split": "train"},
                     {"img_path": "CheXpert-v1.0-small/valid/patient64541/study1/view1_frontal.jpg",
                      "labels": "No Finding", "split": "val"}]
    assert [r["labels"] for r in csv.DictReader(written["chexpert_5x200"].open())] == ["Cardiomegaly"]
    assert [r["condition"] for r in csv.DictReader(written["classes"].open())] == list(FIVE_BY_200)
    out = capsys.readouterr().out
    assert "left out 1 rows: not frontal (Lateral)" in out and "2 of the five classes positive, not one" in out
    assert f"--image_root {tmp_path}" in out
    positive = main(["chexpert", "--input", str(release), "--out_dir", str(tmp_path / "u"), "--uncertain", "positive"])
    assert next(csv.DictReader(positive["chexpert"].open()))["labels"] == "Cardiomegaly;Edema"


def test_the_5x200_protocol_is_top1_accuracy_over_the_five_class_prompts():
    import torch

    from metrics import top1_classification
    from scripts.data.convert_dataset import FIVE_BY_200
    # 200 images per class; for 150 of each the true class scores highest, for the other 50 the next class
    true = [k for k in range(5) for _ in range(200)]
    scores = torch.zeros(1000, 5)
    for i, k in enumerate(true):
        scores[i, k if i % 200 < 150 else (k + 1) % 5] = 1.0
    result = top1_classification(scores, [[k] for k in true], list(FIVE_BY_200))
    assert result["accuracy"] == pytest.approx(0.75)
    assert all(v["recall"] == pytest.approx(0.75) for v in result["per_class"].values())
