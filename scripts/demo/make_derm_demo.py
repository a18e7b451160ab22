"""Synthetic skin-lesion phantoms (not patient data) with a long-tailed class distribution, in
the labelled recipe's layout (seed 004): derm.csv (img_path, labels `;`-separated, split left
to the recipe's stratified split) and classes.csv (condition, description, icd10).

Each condition has its own colour, size and border irregularity; a few images carry two
conditions (two lesions). Rare classes have a handful of images, so oversampling and per-class
metrics have something to show.

    python scripts/demo/make_demo_data.py --recipe derm --out_dir data/demo_derm --num_images 400
"""
from __future__ import annotations

import csv
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: the repository root on the path, for scripts.demo.*
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from scripts.demo.demo_tables import write_rows_csv

# condition: (rgb colour, radius as a share of the image, border irregularity, relative frequency, ICD-10, description)
CONDITIONS = {
    "acne vulgaris": ((200, 70, 70), 0.08, 0.05, 30, "L70.0", "small red inflamed papules"),
    "atopic dermatitis": ((215, 120, 110), 0.28, 0.25, 22, "L20.9", "ill-defined pink eczematous patch"),
    "psoriasis": ((230, 200, 200), 0.24, 0.10, 16, "L40.0", "well-demarcated silvery scaly plaque"),
    "melanocytic nevus": ((110, 70, 40), 0.10, 0.03, 12, "D22.9", "small round evenly brown mole"),
    "melanoma": ((45, 25, 20), 0.18, 0.45, 7, "C43.9", "large dark irregular asymmetric lesion"),
    "vitiligo": ((250, 240, 235), 0.22, 0.20, 5, "L80", "depigmented white patch"),
    "rosacea": ((230, 90, 110), 0.30, 0.35, 3, "L71.9", "diffuse facial redness"),
    "keloid": ((170, 90, 90), 0.14, 0.15, 2, "L91.0", "raised firm scar overgrowth"),
}


def render_lesion(conditions: list[str], size: int, rng: np.random.Generator) -> Image.Image:
    skin = np.array([224, 180, 150]) + rng.normal(0, 8, 3)
    img = Image.new("RGB", (size, size), tuple(int(v) for v in skin))
    d = ImageDraw.Draw(img)
    centres = [(0.5, 0.5)] if len(conditions) == 1 else [(0.3, 0.35), (0.7, 0.65)]
    for cond, (cx, cy) in zip(conditions, centres):
        colour, radius, irregular, *_ = CONDITIONS[cond]
        r = radius * size * rng.uniform(0.85, 1.15) * (0.7 if len(conditions) > 1 else 1.0)
        angles = np.linspace(0, 2 * np.pi, 48, endpoint=False)
        wobble = 1 + irregular * rng.uniform(-1, 1, angles.size)
        pts = [(cx * size + r * w * np.cos(a), cy * size + r * w * np.sin(a)) for a, w in zip(angles, wobble)]
        d.polygon(pts, fill=tuple(int(np.clip(c + rng.normal(0, 10), 0, 255)) for c in colour))
    img = img.filter(ImageFilter.GaussianBlur(size / 128))
    arr = np.asarray(img, dtype=np.float32) + rng.normal(0, 4, (size, size, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def make_derm_demo(out_dir, *, num_images=400, image_size=64, seed=0) -> Path:
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = list(CONDITIONS)
    freq = np.array([CONDITIONS[c][3] for c in names], dtype=float)
    freq /= freq.sum()
    rows = []
    for i in range(num_images):
        labels = [names[rng.choice(len(names), p=freq)]]
        if rng.random() < 0.08:  # a second, different condition
            other = names[rng.choice(len(names), p=freq)]
            if other != labels[0]:
                labels.append(other)
        name = f"images/lesion_{i:05d}.png"
        render_lesion(labels, image_size, rng).save(out_dir / name)
        rows.append({"img_path": name, "labels": ";".join(labels)})
    with (out_dir / "classes.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["condition", "description", "icd10"])
        for c in names:
            w.writerow([c, CONDITIONS[c][5], CONDITIONS[c][4]])
    return write_rows_csv(out_dir / "derm.csv", rows)


if __name__ == "__main__":  # run as a script: the demo makers' one command line, for this recipe
    import subprocess
    import sys
    sys.exit(subprocess.call([sys.executable, str(Path(__file__).with_name("make_demo_data.py")), "--recipe", "derm",
                              *sys.argv[1:]]))
