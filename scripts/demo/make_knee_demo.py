"""Synthetic knee radiograph phantoms (not patient data) in seed 003's CSV layout.

AP knee phantoms: femur and tibia with a joint space whose width follows the Kellgren-Lawrence
grade (0-4), marginal osteophytes from grade 2, subchondral sclerosis from grade 3, and optional
varus angulation (a narrower medial compartment and a tilted tibia). Each image gets an
impression such as "Severe OA of the knee with varus angulation."; the texts repeat, as real
knee impressions do.

    python scripts/demo/make_demo_data.py --recipe knee --out_dir data/demo_knee --num_images 600

writes images/knee_NNNNN.png and knee.csv (img_path relative to the CSV's folder, impression,
split, kl_grade, varus).
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: the repository root on the path, for scripts.demo.*
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from scripts.demo.demo_tables import split_for, write_rows_csv

IMPRESSIONS = {0: "Normal knee X-ray.", 1: "Doubtful narrowing of the knee joint space.",
               2: "Mild OA of the knee", 3: "Moderate OA of the knee with osteophytes",
               4: "Severe OA of the knee"}
GAP = {0: 0.10, 1: 0.08, 2: 0.06, 3: 0.04, 4: 0.015}  # joint space, as a share of the image height


def _g(v: float) -> int:
    return int(round(v * 255))


def impression(kl: int, varus: bool) -> str:
    text = IMPRESSIONS[kl]
    if kl >= 2:
        text += " with varus angulation." if varus else "."
    return text


def render_knee(kl: int, varus: bool, right: bool, size: int, rng: np.random.Generator) -> np.ndarray:
    """One AP knee phantom as a uint8 array (size x size)."""
    big = size * 2  # drawn at 2x and downsampled: smooth edges
    im = Image.new("L", (big, big), _g(0.08))
    d = ImageDraw.Draw(im)
    cx = big * (0.5 + rng.uniform(-0.04, 0.04))
    joint = big * (0.5 + rng.uniform(-0.04, 0.04))
    width = big * rng.uniform(0.40, 0.48)
    d.ellipse([cx - width * 1.05, -big * 0.2, cx + width * 1.05, big * 1.2], fill=_g(0.22))  # soft tissue
    gap = GAP[kl] * big * rng.uniform(0.85, 1.15)
    # medial side: the image's left for a right knee seen AP; varus narrows it
    medial_gap, lateral_gap = (gap * 0.35, gap * 1.25) if varus else (gap, gap)
    left_gap, right_gap = (medial_gap, lateral_gap) if right else (lateral_gap, medial_gap)
    # femur: shaft, then two condyles resting on the joint line
    shaft = width * 0.55
    d.rectangle([cx - shaft / 2, 0, cx + shaft / 2, joint - width * 0.3], fill=_g(0.72))
    d.polygon([(cx - shaft / 2, joint - width * 0.45), (cx + shaft / 2, joint - width * 0.45),
               (cx + width / 2, joint - width * 0.18), (cx - width / 2, joint - width * 0.18)], fill=_g(0.72))
    for side, g in ((-1, left_gap), (1, right_gap)):
        ccx = cx + side * width * 0.24
        bottom = joint - g / 2
        d.ellipse([ccx - width * 0.27, bottom - width * 0.42, ccx + width * 0.27, bottom], fill=_g(0.75))
    # tibia: plateau (tilted under varus), then shaft; fibula on the lateral side
    tilt = math.radians(rng.uniform(4, 8)) * (1 if right else -1) if varus else 0.0
    top_l, top_r = joint + left_gap / 2, joint + right_gap / 2
    plateau = [(cx - width * 0.55, top_l), (cx + width * 0.55, top_r),
               (cx + width * 0.42, joint + width * 0.35), (cx - width * 0.42, joint + width * 0.35)]
    d.polygon(plateau, fill=_g(0.68))
    tib_shaft = width * 0.45
    off = math.tan(tilt) * big * 0.5
    d.polygon([(cx - tib_shaft / 2, joint + width * 0.3), (cx + tib_shaft / 2, joint + width * 0.3),
               (cx + tib_shaft / 2 + off, big), (cx - tib_shaft / 2 + off, big)], fill=_g(0.68))
    fib_x = cx + (1 if right else -1) * width * 0.48
    d.rectangle([fib_x - width * 0.07, joint + width * 0.4, fib_x + width * 0.07, big], fill=_g(0.55))
    if kl >= 3:  # subchondral sclerosis: a bright band under each joint surface
        for x0, x1, y in ((cx - width * 0.5, cx, top_l), (cx, cx + width * 0.5, top_r)):
            d.rectangle([x0, y, x1, y + big * 0.018], fill=_g(0.95))
    if kl >= 2:  # marginal osteophytes: spurs at the joint margins, larger with the grade
        spur = width * (0.06 + 0.05 * (kl - 2)) * rng.uniform(0.8, 1.2)
        for side, top in ((-1, top_l), (1, top_r)):
            edge = cx + side * width * 0.55
            d.polygon([(edge, top), (edge + side * spur, top - spur * 0.4), (edge, top + spur)], fill=_g(0.8))
            fedge = cx + side * width * 0.5
            d.polygon([(fedge, joint - width * 0.2), (fedge + side * spur, joint - width * 0.22 - spur * 0.5),
                       (fedge, joint - width * 0.2 - spur)], fill=_g(0.8))
    im = im.filter(ImageFilter.GaussianBlur(big / 256))
    arr = np.asarray(im.resize((size, size), Image.BILINEAR), dtype=np.float32) / 255
    arr = arr + rng.normal(0, 0.03, arr.shape)
    return (np.clip(arr, 0, 1) * 255).astype(np.uint8)


def make_knee_demo(out_dir, *, num_images=600, image_size=128, seed=0, val_fraction=0.15,
                   test_fraction=0.15) -> Path:
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(num_images):
        kl = int(rng.choice(5, p=[0.3, 0.15, 0.2, 0.2, 0.15]))
        varus = bool(kl >= 2 and rng.random() < 0.4)
        right = bool(rng.random() < 0.5)
        name = f"images/knee_{i:05d}.png"
        Image.fromarray(render_knee(kl, varus, right, image_size, rng), mode="L").save(out_dir / name)
        split = split_for(rng.random(), val_fraction, test_fraction)
        rows.append({"img_path": name, "impression": impression(kl, varus), "split": split,
                     "kl_grade": kl, "varus": int(varus)})
    return write_rows_csv(out_dir / "knee.csv", rows)


if __name__ == "__main__":  # run as a script: the demo makers' one command line, for this recipe
    import subprocess
    import sys
    sys.exit(subprocess.call([sys.executable, str(Path(__file__).with_name("make_demo_data.py")), "--recipe", "knee",
                              *sys.argv[1:]]))
