"""Synthetic chest CT phantom volumes (not patient data) in seed 002's layout.

Each volume is an NPZ {'image': (2, D, H, W) float32} in Hounsfield units: axial slices along D
(feet to head), the patient's right on the image's left, anterior at the top. Body, lungs
(-850 HU), heart, spine, and findings: a lung nodule, a pleural effusion (dependent fluid,
posterior), a consolidation. Channel 0 is the scan, channel 1 the same scan smoothed (a second
reconstruction kernel). A CSV lists img_path (relative to its folder), findings, split.

    python scripts/demo/make_demo_data.py --recipe ct --out_dir data/demo_ct --num_images 300
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: the repository root on the path, for scripts.demo.*
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np

from scripts.demo.demo_tables import split_for, write_rows_csv


def _sentence(finding: str, side: str) -> str:
    return {"nodule": f"Solid nodule in the {side} lung.",
            "effusion": f"{side.capitalize()} pleural effusion.",
            "consolidation": f"Consolidation in the {side} lung."}[finding]


def render_ct(findings: dict, shape=(24, 48, 48), rng=None) -> np.ndarray:
    """(2, D, H, W) float32 HU. findings: {"nodule"|"effusion"|"consolidation": "right"|"left"}."""
    rng = rng or np.random.default_rng(0)
    d, h, w = shape
    z, y, x = np.meshgrid(np.linspace(-1, 1, d), np.linspace(-1, 1, h), np.linspace(-1, 1, w), indexing="ij")
    vol = np.full(shape, -1000.0, np.float32)
    body = (x / 0.9) ** 2 + (y / 0.7) ** 2 < 1
    vol[body] = 40
    lungs = {}
    for side, cx in (("right", -0.42), ("left", 0.42)):  # the patient's right is the image's left
        lung = ((x - cx) / 0.3) ** 2 + (y / 0.5) ** 2 + (z / 1.1) ** 2 < 1
        vol[lung] = -850
        lungs[side] = (lung, cx)
    vol[((x + 0.05) / 0.22) ** 2 + ((y + 0.15) / 0.25) ** 2 + (z / 0.8) ** 2 < 1] = 45  # heart
    vol[(x / 0.1) ** 2 + ((y - 0.55) / 0.1) ** 2 < 1] = 700  # spine (posterior)
    for finding, side in findings.items():
        lung, cx = lungs[side]
        if finding == "nodule":
            c = (rng.uniform(-0.5, 0.5), rng.uniform(-0.25, 0.25), cx + rng.uniform(-0.1, 0.1))
            r = rng.uniform(0.12, 0.18)
            vol[((z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2 < r ** 2) & lung] = 40
        elif finding == "effusion":
            level = rng.uniform(0.1, 0.3)  # fluid fills the dependent (posterior, lower y) part
            vol[lung & (y > level)] = 10
        elif finding == "consolidation":
            c = (rng.uniform(-0.4, 0.4), rng.uniform(-0.3, 0.1))
            vol[lung & (((z - c[0]) / 0.45) ** 2 + ((y - c[1]) / 0.3) ** 2 < 1)] = 20
    vol += rng.normal(0, 15, shape).astype(np.float32)
    smooth = vol.copy()
    for axis in range(3):
        smooth = (np.roll(smooth, 1, axis) + smooth + np.roll(smooth, -1, axis)) / 3
    return np.stack([vol, smooth]).astype(np.float32)


def make_ct_demo(out_dir, *, num_images=300, shape=(24, 48, 48), seed=0, val_fraction=0.15,
                 test_fraction=0.15) -> Path:
    out_dir = Path(out_dir)
    (out_dir / "volumes").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(num_images):
        findings = {}
        for f, p in (("nodule", 0.3), ("effusion", 0.3), ("consolidation", 0.25)):
            if rng.random() < p:
                findings[f] = "right" if rng.random() < 0.5 else "left"
        text = " ".join(_sentence(f, s) for f, s in findings.items()) or "No acute findings in the chest."
        name = f"volumes/ct_{i:05d}.npz"
        np.savez_compressed(out_dir / name, image=render_ct(findings, shape, rng))
        split = split_for(rng.random(), val_fraction, test_fraction)
        rows.append({"img_path": name, "findings": text, "split": split, **{f: int(f in findings) for f in
                                                                              ("nodule", "effusion", "consolidation")}})
    return write_rows_csv(out_dir / "ct.csv", rows)


if __name__ == "__main__":  # run as a script: the demo makers' one command line, for this recipe
    import subprocess
    import sys
    sys.exit(subprocess.call([sys.executable, str(Path(__file__).with_name("make_demo_data.py")), "--recipe", "ct",
                              *sys.argv[1:]]))
