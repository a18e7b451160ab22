"""Generate the embedded demo data set: synthetic PA chest-radiograph phantoms.

The images are drawn, not taken from patients, with known findings, report-style
captions, labels and VQA triplets, so that every stage of the repo can be trained and
evaluated on a CPU with no download.

    python scripts/demo/make_demo_data.py --out_dir data/demo

Orientation follows radiological convention: the image is viewed as if facing the
patient, so the patient's RIGHT lung is on the IMAGE LEFT and the heart, which bulges
to the patient's left, is on the IMAGE RIGHT. Every "left"/"right" in the labels and
the text is the patient's side; ``_IMAGE_SIGN`` is the only place that maps it to pixels.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import multiprocessing
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: the repository root on the path, for scripts.demo.*
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

FINDINGS = [
    {"name": "cardiomegaly", "icd10": "I51.7", "display": "Cardiomegaly",
     "positive_prompt": "cardiomegaly", "negative_prompt": "no cardiomegaly", "lateral": False},
    {"name": "pleural_effusion", "icd10": "J90", "display": "Pleural effusion",
     "positive_prompt": "pleural effusion", "negative_prompt": "no pleural effusion",
     "lateral": True},
    {"name": "consolidation", "icd10": "J18.9", "display": "Consolidation",
     "positive_prompt": "consolidation", "negative_prompt": "no consolidation", "lateral": True},
    {"name": "nodule", "icd10": "R91.1", "display": "Lung nodule",
     "positive_prompt": "lung nodule", "negative_prompt": "no lung nodule", "lateral": True},
    {"name": "pneumothorax", "icd10": "J93.9", "display": "Pneumothorax",
     "positive_prompt": "pneumothorax", "negative_prompt": "no pneumothorax", "lateral": True},
]
FINDING_NAMES = [f["name"] for f in FINDINGS]
ICD10 = {f["name"]: f["icd10"] for f in FINDINGS}
# The labelled example's class prompts (--class_prompt_template): the recipe's default wording is
# the dermatology seed's, and classes.csv's description is the finding's plain name.
CLASS_PROMPT_TEMPLATE = "Chest X-ray showing {description}."

# Patient side -> direction on the image x axis, measured from the midline.
_IMAGE_SIGN = {"right": -1.0, "left": +1.0}

NORMAL_FRACTION = 0.33


# --------------------------------------------------------------------------- sampling

def _sample_spec(rng: np.random.Generator, index: int) -> dict:
    """Findings of one image: names plus the side/zone/size details the text needs."""
    if rng.random() < NORMAL_FRACTION:
        names: list[str] = []
    else:
        k = int(rng.choice([1, 2, 3], p=[0.5, 0.35, 0.15]))
        if k >= 2 and rng.random() < 0.35:
            # Heart failure gives both together often enough that a model should see it.
            names = ["cardiomegaly", "pleural_effusion"]
        else:
            names = []
        rest = [n for n in FINDING_NAMES if n not in names]
        names += [str(n) for n in rng.choice(rest, size=k - len(names), replace=False)]
    names = [n for n in FINDING_NAMES if n in names]

    details: dict[str, dict] = {}
    sides = ["right", "left"]
    if "cardiomegaly" in names:
        details["cardiomegaly"] = {"ctr": round(float(rng.uniform(0.58, 0.67)), 2)}
    if "pleural_effusion" in names:
        details["pleural_effusion"] = {"side": sides[rng.integers(2)],
                                       "size": ["small", "moderate"][rng.integers(2)]}
    if "pneumothorax" in names:
        # A same-side effusion would make a hydropneumothorax, which the text does not cover.
        options = [s for s in sides
                   if s != details.get("pleural_effusion", {}).get("side")]
        details["pneumothorax"] = {"side": options[rng.integers(len(options))],
                                   "size": ["small", "moderate"][rng.integers(2)]}
    blocked = set()  # (side, zone) where an opacity would be hidden or ambiguous
    if "pleural_effusion" in details:
        blocked.add((details["pleural_effusion"]["side"], "lower"))
    if "pneumothorax" in details:
        blocked |= {(details["pneumothorax"]["side"], z) for z in ("upper", "lower")}
    for name in ("consolidation", "nodule"):
        if name in names:
            hidden = set(blocked)
            if "cardiomegaly" in names:
                hidden.add(("left", "lower"))  # an enlarged heart covers most of that zone
            spots = [(s, z) for s in sides for z in ("upper", "lower") if (s, z) not in hidden]
            side, zone = spots[rng.integers(len(spots))]
            details[name] = {"side": side, "zone": zone}
            blocked.add((side, zone))
    return {"id": f"demo_{index:05d}", "index": index, "findings": names, "details": details}


# --------------------------------------------------------------------------- drawing

def _to_px(points, size):
    return [(float(x) * size, float(y) * size) for x, y in points]


def _soft(im: Image.Image, sigma: float) -> np.ndarray:
    """Blur an 8-bit mask and return it as float in 0..1.

    One box pass of radius 1.7*sigma has about the spread of a Gaussian of that sigma
    at a third of the cost, which matters at a dozen masks per image.
    """
    if sigma > 0:
        im = im.filter(ImageFilter.BoxBlur(1.7 * sigma))
    return np.asarray(im, dtype=np.float32) / 255.0


def _shapes_mask(size, polygons=(), ellipses=(), blur=0.0) -> np.ndarray:
    """Union of polygons and (cx, cy, rx, ry) ellipses, in image fractions, softened."""
    im = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(im)
    for points in polygons:
        draw.polygon(_to_px(points, size), fill=255)
    for cx, cy, rx, ry in ellipses:
        draw.ellipse([(cx - rx) * size, (cy - ry) * size, (cx + rx) * size, (cy + ry) * size],
                     fill=255)
    return _soft(im, blur)


def _poly_mask(points, size, blur=0.0) -> np.ndarray:
    return _shapes_mask(size, polygons=[points], blur=blur)


def _blur(arr01: np.ndarray, sigma: float) -> np.ndarray:
    return _soft(Image.fromarray(np.clip(arr01 * 255.0 + 0.5, 0, 255).astype(np.uint8)), sigma)


def _lung_geometry(rng, cx, side, scale):
    s = _IMAGE_SIGN[side]
    medial = rng.uniform(0.045, 0.06)
    lateral = rng.uniform(0.305, 0.335) * scale
    # The right hemidiaphragm sits a little higher than the left (liver below it).
    y_cp = rng.uniform(0.76, 0.80) - (0.02 if side == "right" else 0.0)
    return {
        "side": side, "x_m": cx + s * medial, "x_l": cx + s * lateral,
        "y_t": rng.uniform(0.11, 0.15), "y_cp": y_cp,
        "y_mb": y_cp - rng.uniform(0.02, 0.05), "dome_h": rng.uniform(0.05, 0.075),
    }


def _lung_outline(g, n=28):
    """Lateral border (apex -> costophrenic angle), dome, medial border, as (x, y) arrays."""
    x_m, x_l, y_t, y_cp, y_mb = g["x_m"], g["x_l"], g["y_t"], g["y_cp"], g["y_mb"]
    x_a = x_m + 0.42 * (x_l - x_m)
    t = np.linspace(0.0, 1.0, n)
    lat = np.stack([x_a + (x_l - x_a) * np.sin(t * np.pi / 2) ** 0.55, y_t + (y_cp - y_t) * t], 1)
    s = t[1:]
    # sin**0.7 rises steeply at s=0, which gives the acute costophrenic recess.
    dome = np.stack([x_l + (x_m - x_l) * s,
                     y_cp + (y_mb - y_cp) * s - g["dome_h"] * np.sin(np.pi * s) ** 0.7], 1)
    u = t[1:-1]
    med = np.stack([x_m + (x_a - x_m) * u ** 2.5, y_mb + (y_t - y_mb) * u], 1)
    return lat, dome, med


def _collapsed_outline(g, d_lat, d_apex):
    """Lung outline pulled away from the lateral wall and the apex (pneumothorax)."""
    width, height = abs(g["x_l"] - g["x_m"]), g["y_cp"] - g["y_t"]
    kx, ky = (width - d_lat) / width, (height - d_apex) / height
    return [np.stack([g["x_m"] + (p[:, 0] - g["x_m"]) * kx,
                      g["y_cp"] + (p[:, 1] - g["y_cp"]) * ky], 1) for p in _lung_outline(g)]


def _zone_point(g, zone, frac_lateral, rng):
    height = g["y_cp"] - g["y_t"]
    fy = rng.uniform(0.22, 0.36) if zone == "upper" else rng.uniform(0.56, 0.66)
    return g["x_m"] + frac_lateral * (g["x_l"] - g["x_m"]), g["y_t"] + fy * height


def render_phantom(spec: dict, image_size: int = 256, seed: int = 0) -> np.ndarray:
    """Draw one phantom as a (H, W) uint8 array.

    The anatomy, the findings and the noise come from separate random streams seeded by
    (seed, index), so the same image with and without a finding differs only by it.
    """
    S = int(image_size)
    streams = np.random.SeedSequence([int(seed), int(spec["index"])]).spawn(3)
    rng_anat, rng_find, rng_noise = (np.random.default_rng(s) for s in streams)
    det = spec["details"]
    px = S / 256.0  # blur radii and line widths were tuned at 256 px
    centres = (np.arange(S, dtype=np.float32) + 0.5) / S
    X, Y = centres[None, :], centres[:, None]  # broadcast instead of full grids

    cx = 0.5 + float(np.clip(rng_anat.normal(0, 0.012), -0.03, 0.03))
    scale = rng_anat.uniform(0.95, 1.04)
    air = rng_anat.uniform(5, 20)
    tissue = rng_anat.uniform(140, 165)
    lung_level = rng_anat.uniform(38, 60)
    medi_level = tissue + rng_anat.uniform(14, 24)
    lungs = {side: _lung_geometry(rng_anat, cx, side, scale) for side in ("right", "left")}

    # Body: neck, sloping shoulders, chest wall; the abdomen gets denser towards the bottom.
    bw = rng_anat.uniform(0.45, 0.49) * scale
    body_pts = [(cx - 0.075, -0.02), (cx + 0.075, -0.02), (cx + 0.085, 0.05),
                (cx + bw, rng_anat.uniform(0.10, 0.14)), (cx + bw + 0.01, 1.02),
                (cx - bw - 0.01, 1.02), (cx - bw, rng_anat.uniform(0.10, 0.14)),
                (cx - 0.085, 0.05)]
    body = _poly_mask(body_pts, S, blur=3.0 * px)
    # Below the domes the abdomen is as dense as the heart, so the heart's lower edge
    # disappears into it as on a real film.
    belly = tissue + (medi_level - tissue) * np.clip((Y - 0.66) / 0.14, 0, 1)
    img = air + (belly - air) * body

    outlines = {side: _lung_outline(g) for side, g in lungs.items()}
    # "aerated" is how much air each pixel's lung holds: fluid and consolidation replace
    # air, so they lower it instead of being painted on top (no seams at the lung edge).
    aerated = {side: _poly_mask(np.concatenate(o), S, blur=1.6 * px)
               for side, o in outlines.items()}
    lung_shape = dict(aerated)

    if "pleural_effusion" in det:
        d = det["pleural_effusion"]
        g = lungs[d["side"]]
        frac = (rng_find.uniform(0.22, 0.28) if d["size"] == "small"
                else rng_find.uniform(0.34, 0.44))
        level = g["y_cp"] - frac * (g["y_cp"] - g["y_t"])
        r_lat = np.clip((X - g["x_m"]) / (g["x_l"] - g["x_m"]), 0.0, 1.2)
        # The meniscus climbs the lateral chest wall and the fluid fills the
        # costophrenic recess, which is what blunts the angle.
        meniscus = level - rng_find.uniform(0.07, 0.10) * r_lat ** 2
        below = 1.0 / (1.0 + np.exp(np.clip((meniscus - Y) / (0.007 * scale), -50.0, 50.0)))
        depth = np.clip((Y - meniscus) / 0.06, 0.0, 1.0)
        aerated[d["side"]] = aerated[d["side"]] * (1.0 - below * (0.85 + 0.13 * depth))

    if "consolidation" in det:
        d = det["consolidation"]
        g = lungs[d["side"]]
        ccx, ccy = _zone_point(g, d["zone"], rng_find.uniform(0.5, 0.62), rng_find)
        blob = _shapes_mask(S, ellipses=[
            (ccx + rng_find.normal(0, 0.022), ccy + rng_find.normal(0, 0.022),
             rng_find.uniform(0.045, 0.065), rng_find.uniform(0.045, 0.07))
            for _ in range(int(rng_find.integers(3, 6)))], blur=4.5 * px)
        aerated[d["side"]] = aerated[d["side"]] * (1.0 - rng_find.uniform(0.75, 0.88) * blob)

    ptx = np.zeros((S, S), dtype=np.float32)
    ptx_dark = 0.0
    if "pneumothorax" in det:
        d = det["pneumothorax"]
        g = lungs[d["side"]]
        d_lat = (rng_find.uniform(0.06, 0.08) if d["size"] == "small"
                 else rng_find.uniform(0.10, 0.13))
        c_lat, c_dome, c_med = _collapsed_outline(g, d_lat, d_lat * rng_find.uniform(1.1, 1.4))
        collapsed = _poly_mask(np.concatenate([c_lat, c_dome, c_med]), S, blur=0.8 * px)
        ptx = np.clip(lung_shape[d["side"]] - collapsed, 0, 1)
        # The collapsed lung holds less air, so it reads denser than the empty pleural space.
        aerated[d["side"]] = aerated[d["side"]] * (1.0 - rng_find.uniform(0.15, 0.22) * collapsed)
        ptx_dark = rng_find.uniform(12, 18)

    lung_air = aerated["right"] + aerated["left"]
    img = img - (tissue - lung_level) * lung_air - ptx_dark * ptx

    # Vessel markings fan out from each hilum and fade towards the periphery; their
    # absence beyond the pleural line is what makes a pneumothorax readable.
    marks_im = Image.new("L", (S, S), 0)
    draw = ImageDraw.Draw(marks_im)
    for side, g in lungs.items():
        s = _IMAGE_SIGN[side]
        hx, hy = g["x_m"] + s * 0.03, rng_anat.uniform(0.40, 0.45)
        for _ in range(int(rng_anat.integers(24, 34))):
            ang = rng_anat.uniform(-1.3, 1.35)  # 0 = lateral, negative = up
            x, y, w = hx, hy, 3.0
            for _seg in range(3):
                ang += rng_anat.normal(0, 0.25)
                step = rng_anat.uniform(0.05, 0.10)
                nx, ny = x + s * math.cos(ang) * step, y + math.sin(ang) * step
                draw.line(_to_px([(x, y), (nx, ny)], S), fill=int(255 * w / 3.0),
                          width=max(1, round(w * px * 0.7)))
                x, y, w = nx, ny, max(1.0, w - 0.9)
    marks = _soft(marks_im, 0.7 * px)
    # Interstitial texture on top of the vessels, so aerated lung is never smooth.
    texture = _blur(np.clip(0.5 + 0.5 * rng_anat.standard_normal((S, S), dtype=np.float32), 0, 1),
                    1.2 * px)
    img = img + (rng_anat.uniform(22, 32) * marks + rng_anat.uniform(14, 20) * (texture - 0.5)
                 ) * lung_air * (1.0 - ptx)

    # Posterior ribs (arcs from the spine running laterally and down) and clavicles.
    bones_im = Image.new("L", (S, S), 0)
    draw = ImageDraw.Draw(bones_im)
    spacing = rng_anat.uniform(0.062, 0.072)
    t = np.linspace(0, 1, 16)
    for s in (-1.0, 1.0):
        for i in range(9):
            pts = np.stack([cx + s * (0.03 + 0.37 * scale * t),
                            0.08 + i * spacing - 0.04 * np.sin(np.pi * t * 0.7) + 0.14 * t ** 2], 1)
            draw.line(_to_px(pts, S), fill=110, width=max(1, round(4 * px)), joint="curve")
        draw.line(_to_px([(cx + s * 0.04, 0.15), (cx + s * 0.2, 0.115), (cx + s * 0.36, 0.09)], S),
                  fill=255, width=max(1, round(6 * px)), joint="curve")
    bones = _soft(bones_im, 1.2 * px)
    img = img + rng_anat.uniform(24, 34) * bones * body

    # Hila, then the mediastinum with the aortic knob on the patient's left, the
    # trachea inside it, and the spine behind everything.
    hila = _shapes_mask(S, ellipses=[(g["x_m"] + _IMAGE_SIGN[side] * 0.035,
                                      rng_anat.uniform(0.40, 0.44), 0.03, 0.05)
                                     for side, g in lungs.items()], blur=3.0 * px)
    img = img + rng_anat.uniform(15, 25) * hila
    medi = _shapes_mask(
        S, polygons=[[(cx - 0.05, -0.02), (cx + 0.05, -0.02), (cx + 0.06, 0.55),
                      (cx - 0.055, 0.55)]],
        ellipses=[(cx + _IMAGE_SIGN["left"] * 0.065, 0.29, 0.035, 0.03)], blur=1.5 * px)
    img = img + (medi_level - img) * medi
    trachea = _poly_mask([(cx - 0.017, -0.02), (cx + 0.017, -0.02), (cx + 0.014, 0.33),
                          (cx - 0.014, 0.33)], S, blur=1.2 * px)
    img = img - rng_anat.uniform(20, 30) * trachea

    # Heart: about a third right of the midline and two thirds left of it, i.e. mostly
    # on the image right. Width = CTR x thoracic width at the bases, which is how
    # cardiomegaly is read; a right-atrial and a left-ventricular lobe give the shape.
    thorax_w = abs(lungs["left"]["x_l"] - lungs["right"]["x_l"])
    ctr = det["cardiomegaly"]["ctr"] if "cardiomegaly" in det else rng_anat.uniform(0.39, 0.46)
    hw, hh = ctr * thorax_w, 0.11 + 0.3 * (ctr - 0.42)
    sl = _IMAGE_SIGN["left"]
    y_c = 0.5 * (lungs["right"]["y_mb"] + lungs["left"]["y_mb"]) - 0.75 * hh
    heart = _shapes_mask(S, ellipses=[(cx + sl * 0.25 * hw, y_c + 0.1 * hh, 0.40 * hw, hh),
                                      (cx - sl * 0.10 * hw, y_c - 0.05 * hh, 0.25 * hw, 0.8 * hh)],
                         blur=1.5 * px)
    img = img + (medi_level - img) * heart

    spine = _poly_mask([(cx - 0.03, -0.02), (cx + 0.03, -0.02), (cx + 0.03, 1.02),
                        (cx - 0.03, 1.02)], S, blur=1.5 * px)
    img = img + rng_anat.uniform(8, 14) * spine

    if "nodule" in det:
        d = det["nodule"]
        g = lungs[d["side"]]
        r = rng_find.uniform(0.03, 0.05)
        shape = lung_shape[d["side"]]
        best, best_clear = None, -np.inf
        for _try in range(40):
            cand = _zone_point(g, d["zone"], rng_find.uniform(0.3, 0.9), rng_find)
            # Clearance = worst lung-minus-heart value over the centre and four rim points,
            # so the nodule sits wholly in aerated lung rather than behind the heart.
            probe = [(min(S - 1, max(0, int((cand[1] + dy * r) * S))),
                      min(S - 1, max(0, int((cand[0] + dx * r) * S))))
                     for dx, dy in ((0, 0), (1.3, 0), (-1.3, 0), (0, 1.3), (0, -1.3))]
            clear = min(float(shape[i] - heart[i]) for i in probe)
            if clear > best_clear:
                best, best_clear = cand, clear
            if clear > 0.9:
                break
        ncx, ncy = best
        nod = _shapes_mask(S, ellipses=[(ncx, ncy, r, r)], blur=0.15 * r * S)
        img = img + rng_find.uniform(0.8, 0.92) * nod * np.maximum(tissue + 5 - img, 0.0)

    if "pneumothorax" in det:
        line_im = Image.new("L", (S, S), 0)
        # Only the apical/lateral edge shows; the medial edge hides behind the mediastinum.
        ImageDraw.Draw(line_im).line(_to_px(c_lat[: int(len(c_lat) * 0.9)], S), fill=255,
                                     width=max(1, round(1.6 * px)), joint="curve")
        line = _soft(line_im, 0.5 * px)
        img = img + rng_find.uniform(45, 65) * line

    # Exposure, contrast and quantum noise differ per film.
    img = (img - 100.0) * rng_noise.uniform(0.9, 1.1) + 100.0 + rng_noise.uniform(-10, 10)
    mottle = _blur(np.clip(0.5 + 0.5 * rng_noise.standard_normal((S, S), dtype=np.float32), 0, 1),
                   2.0 * px)
    img = img + rng_noise.uniform(6, 12) * (mottle - 0.5)
    img = img + rng_noise.uniform(2.0, 4.5) * rng_noise.standard_normal((S, S), dtype=np.float32)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _render_to_file(job):
    spec, image_size, seed, path = job
    arr = render_phantom(spec, image_size, seed)
    buf = io.BytesIO()
    # Level 1 is twice as fast as the default and only ~15% larger.
    Image.fromarray(arr).save(buf, format="PNG", compress_level=1)
    Path(path).write_bytes(buf.getvalue())
    return spec["id"]


# --------------------------------------------------------------------------- text

def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _pick(rng, options):
    return options[int(rng.integers(len(options)))]


def _positive_sentence(name, d, rng) -> str:
    if name == "cardiomegaly":
        degree = "mild" if d["ctr"] < 0.62 else "moderate"
        return _pick(rng, [
            "Enlarged cardiac silhouette.",
            "The heart is enlarged.",
            f"Cardiomegaly, with a cardiothoracic ratio of about {d['ctr']:.2f}.",
            "The cardiac silhouette is enlarged.",
            f"{_cap(degree)} cardiomegaly.",
        ])
    if name == "pleural_effusion":
        side, size = d["side"], d["size"]
        return _pick(rng, [
            f"{_cap(size)} {side} pleural effusion.",
            f"There is a {size} {side} pleural effusion with blunting of the {side} "
            "costophrenic angle.",
            f"{_cap(size)} {side}-sided pleural effusion.",
            f"Blunting of the {side} costophrenic angle with a meniscus, consistent with a "
            f"{size} pleural effusion.",
        ])
    if name == "consolidation":
        side, zone = d["side"], d["zone"]
        return _pick(rng, [
            f"{_cap(side)} {zone} lobe consolidation.",
            f"Focal consolidation in the {side} {zone} lobe.",
            f"Patchy airspace opacity in the {side} {zone} zone, consistent with consolidation.",
            f"There is consolidation in the {side} {zone} lung zone.",
        ])
    if name == "nodule":
        side, zone = d["side"], d["zone"]
        return _pick(rng, [
            f"A small round nodule in the {side} {zone} lung zone.",
            f"Well-circumscribed pulmonary nodule projecting over the {side} {zone} lung.",
            f"There is a solitary nodular opacity in the {side} {zone} zone.",
            f"{_cap(side)} {zone} zone pulmonary nodule.",
        ])
    if name == "pneumothorax":
        side, size = d["side"], d["size"]
        return _pick(rng, [
            f"{_cap(size)} {side} pneumothorax.",
            f"There is a {size} {side} apical pneumothorax with a visible pleural line.",
            f"{_cap(side)}-sided pneumothorax, {size} in size.",
            f"A {size} {side} pneumothorax is present, with absent lung markings peripherally.",
        ])
    raise KeyError(name)


_NEGATIVE = {
    "cardiomegaly": ["Heart size is normal.", "The cardiac silhouette is normal in size.",
                     "Normal heart size.", "No cardiomegaly."],
    "pleural_effusion": ["No pleural effusion.", "No pleural effusions.",
                         "There is no pleural effusion."],
    "consolidation": ["No focal consolidation.", "No consolidation.",
                      "No focal airspace consolidation."],
    "nodule": ["No pulmonary nodules.", "No suspicious pulmonary nodule.",
               "No nodules or masses."],
    "pneumothorax": ["No pneumothorax.", "There is no pneumothorax.",
                     "No evidence of pneumothorax."],
}

_IMPRESSION_PHRASE = {
    "cardiomegaly": lambda d, r: _pick(r, ["cardiomegaly", "enlarged cardiac silhouette"]),
    "pleural_effusion": lambda d, r: f"{d['size']} {d['side']} pleural effusion",
    "consolidation": lambda d, r: _pick(r, [
        f"{d['side']} {d['zone']} lobe consolidation",
        f"{d['side']} {d['zone']} lobe consolidation, compatible with pneumonia"]),
    "nodule": lambda d, r: _pick(r, [
        f"{d['side']} {d['zone']} zone pulmonary nodule",
        f"{d['side']} {d['zone']} pulmonary nodule; CT is recommended for further evaluation"]),
    "pneumothorax": lambda d, r: f"{d['size']} {d['side']} pneumothorax",
}

_NORMAL_IMPRESSIONS = ["No acute cardiopulmonary abnormality.",
                       "No acute cardiopulmonary process.",
                       "Normal chest radiograph.",
                       "No radiographic evidence of acute disease."]


def _report(spec, rng) -> tuple[str, str]:
    present = spec["findings"]
    det = spec["details"]
    order = list(present)
    rng.shuffle(order)
    sentences = [_positive_sentence(n, det[n], rng) for n in order]

    absent = [n for n in FINDING_NAMES if n not in present]
    rng.shuffle(absent)
    n_neg = len(absent) if not present else int(rng.integers(1, len(absent) + 1)) if absent else 0
    negated = absent[:n_neg]
    if "pleural_effusion" in negated and "pneumothorax" in negated and rng.random() < 0.4:
        negated.remove("pneumothorax")
        negated[negated.index("pleural_effusion")] = "_effusion_or_ptx"
    for n in negated:
        sentences.append("No pleural effusion or pneumothorax." if n == "_effusion_or_ptx"
                         else _pick(rng, _NEGATIVE[n]))
    lung_findings = {"pleural_effusion", "consolidation", "nodule", "pneumothorax"}
    if not lung_findings & set(present) and rng.random() < 0.6:
        sentences.insert(len(present), _pick(rng, ["The lungs are clear.",
                                                   "The lungs are well expanded and clear."]))
    if rng.random() < 0.4:
        sentences.append(_pick(rng, ["The mediastinal contours are unremarkable.",
                                     "The visualized osseous structures are intact.",
                                     "Trachea is midline."]))
    findings_text = " ".join(sentences)

    if not present:
        impression = _pick(rng, _NORMAL_IMPRESSIONS)
    else:
        phrases = [_IMPRESSION_PHRASE[n](det[n], rng) for n in present]
        if len(phrases) > 1 and rng.random() < 0.5:
            impression = " ".join(f"{i}. {_cap(p)}." for i, p in enumerate(phrases, 1))
        else:
            impression = _cap("; ".join(phrases)) + "."
    return findings_text, impression


_CLOSED_TERMS = {"cardiomegaly": "cardiomegaly", "pleural_effusion": "a pleural effusion",
                 "consolidation": "consolidation", "nodule": "a lung nodule",
                 "pneumothorax": "a pneumothorax"}
_CLOSED_TEMPLATES = ["Is there {t}?", "Does this chest X-ray show {t}?",
                     "Is there evidence of {t}?", "Do you see {t} in this image?",
                     "Does the image show {t}?"]
_LOCATION_NOUN = {"pleural_effusion": "pleural effusion", "pneumothorax": "pneumothorax",
                  "consolidation": "consolidation", "nodule": "nodule"}
_SIDE_TEMPLATES = ["Which side is the {n} on?", "On which side is the {n}?",
                   "Is the {n} on the left or the right?", "Which lung has the {n}?"]
_ZONE_TEMPLATES = ["Where is the {n}?", "Which lung zone contains the {n}?",
                   "In which part of the lungs is the {n}?"]
_OPEN_TEMPLATES = ["Describe the findings.", "What are the findings in this chest X-ray?",
                   "Describe the findings in this radiograph.",
                   "Write the findings section of the report."]


def _vqa(spec, findings_text, rng) -> list[dict]:
    image = f"images/{spec['id']}.png"
    present = spec["findings"]
    absent = [n for n in FINDING_NAMES if n not in present]
    rng.shuffle(absent)
    # As many "no" as "yes" questions, so always answering one way scores 50%.
    asked = list(present) + absent[: max(1, len(present))]
    rng.shuffle(asked)
    out = []
    for n in asked:
        out.append({"image": image,
                    "problem": _pick(rng, _CLOSED_TEMPLATES).format(t=_CLOSED_TERMS[n]),
                    "normal_caption": "yes" if n in present else "no",
                    "question_type": "closed", "finding": n})
    for n in present:
        if n not in _LOCATION_NOUN:
            continue
        d = spec["details"][n]
        if "zone" in d and rng.random() < 0.6:
            q, a = _pick(rng, _ZONE_TEMPLATES), f"{d['side']} {d['zone']}"
        else:
            q, a = _pick(rng, _SIDE_TEMPLATES), d["side"]
        out.append({"image": image, "problem": q.format(n=_LOCATION_NOUN[n]),
                    "normal_caption": a, "question_type": "location", "finding": n})
    out.append({"image": image, "problem": _pick(rng, _OPEN_TEMPLATES),
                "normal_caption": findings_text, "question_type": "open", "finding": None})
    return out


# --------------------------------------------------------------------------- splits

def _assign_splits(specs, val_fraction, test_fraction, rng) -> list[str]:
    """Stratify on each image's rarest finding so small sets still cover every finding."""
    counts = {n: sum(n in s["findings"] for s in specs) for n in FINDING_NAMES}
    strata: dict[str, list[int]] = {}
    for i, s in enumerate(specs):
        key = min(s["findings"], key=lambda n: (counts[n], n)) if s["findings"] else "normal"
        strata.setdefault(key, []).append(i)
    split = ["train"] * len(specs)
    for key in sorted(strata):
        idx = list(strata[key])
        rng.shuffle(idx)
        n = len(idx)
        n_val = int(round(n * val_fraction))
        n_test = int(round(n * test_fraction))
        if n >= 3:
            n_val = max(n_val, 1 if val_fraction > 0 else 0)
            n_test = max(n_test, 1 if test_fraction > 0 else 0)
        for i in idx[:n_val]:
            split[i] = "val"
        for i in idx[n_val:n_val + n_test]:
            split[i] = "test"
    # Strata follow only the rarest finding; top up any finding a held-out split missed.
    for target, frac in (("val", val_fraction), ("test", test_fraction)):
        if frac <= 0:
            continue
        for n in FINDING_NAMES:
            if any(split[i] == target and n in s["findings"] for i, s in enumerate(specs)):
                continue
            donors = [i for i, s in enumerate(specs) if split[i] == "train" and n in s["findings"]]
            if len(donors) >= 2:
                donors.sort(key=lambda i: (len(specs[i]["findings"]), i))
                split[donors[0]] = target
    return split


# --------------------------------------------------------------------------- main

def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


_README = """\
Synthetic demo data set. Every image here is a drawn phantom of a PA chest radiograph,
made by scripts/demo/make_demo_data.py (seed {seed}); none of it is patient data. Findings
(cardiomegaly, pleural effusion, consolidation, lung nodule, pneumothorax) were drawn in on
purpose, and the labels, captions and answers are generated from the same random draw, so they
agree with the pixels. Left/right always means the patient's side: the patient's right lung is
on the image left. images/ holds the 8-bit PNGs; stage0_*.json and stage1_*.json (identical)
list image, report-style caption ("FINDINGS: ... IMPRESSION: ...") and 0/1 labels per split;
stage2_*.json holds VQA triplets (image, problem = question, normal_caption = answer,
question_type closed/location/open, finding); demo.csv has one row per image with its absolute
img_path, the findings and impression text, split, one 0/1 column per finding, the ICD-10
codes, the relative image path and `labels` (the findings present, ';'-separated; with classes.csv
the labelled recipe's example, trained with --class_prompt_template "{template}");
findings.json lists the findings with ICD-10 codes and zero-shot prompts; pretrain_train.json
(train images only) adds a single-finding statement per image to the captions, the corpus the
quickstart's stand-in for a pretrained SigLIP learns from. Paths in the JSON files are relative
to this folder, so pass it as --image_root.
"""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out_dir", required=True, type=Path)
    p.add_argument("--force", action="store_true",
                   help="write into a folder that holds other files (same-named ones are replaced)")
    p.add_argument("--num_images", type=int, default=1000)
    p.add_argument("--image_size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val_fraction", type=float, default=0.1)
    p.add_argument("--test_fraction", type=float, default=0.1)
    p.add_argument("--num_workers", type=int, default=2)
    p.add_argument("--recipe", choices=["cxr", "knee", "ct", "derm"], default="cxr",
                   help="knee: knee radiograph phantoms by Kellgren-Lawrence grade in seed 003's CSV layout "
                        "(scripts/demo/make_knee_demo.py); ct: chest CT phantom volumes as NPZ in seed 002's layout "
                        "(scripts/demo/make_ct_demo.py; --image_size sets H = W, depth is half of it); derm: long-tailed "
                        "skin-lesion phantoms with classes.csv (scripts/demo/make_derm_demo.py)")
    args = p.parse_args(argv)
    if args.num_images < 1:
        p.error("--num_images must be at least 1")
    if args.image_size < 32:
        p.error("--image_size must be at least 32")
    if not (0 <= args.val_fraction < 1 and 0 <= args.test_fraction < 1
            and args.val_fraction + args.test_fraction < 1):
        p.error("--val_fraction and --test_fraction must be in [0, 1) and sum to less than 1")
    return args


MARKER = ".made_by_make_demo_data"


def check_out_dir(out_dir: Path, force: bool) -> None:
    """Refuse a folder holding files this script did not write: the demo writes stage0_*.json,
    demo.csv, classes.csv, images/... and deletes stale images/demo_*.png, which in a user's data
    folder would be their data. An earlier demo (the marker, or the CXR demo's README.txt) is
    rewritten in place."""
    if out_dir.exists() and not out_dir.is_dir():
        raise SystemExit(f"error: --out_dir {out_dir}: a file, not a folder; pass a new or empty folder")
    if force or not out_dir.is_dir() or (out_dir / MARKER).is_file():
        return
    readme = out_dir / "README.txt"
    if readme.is_file() and "made by scripts/demo/make_demo_data.py" in readme.read_text(errors="replace"):
        return
    entries = sorted(p.name for p in out_dir.iterdir())
    if entries:
        raise SystemExit(f"error: --out_dir {out_dir}: the folder holds files the demo did not write "
                         f"({', '.join(entries[:3])}{', ...' if len(entries) > 3 else ''}), which files of the "
                         "same names (stage0_*.json, demo.csv, images/...) would replace; pass a new or empty "
                         "folder, or --force to write there anyway")


def main(argv=None) -> Path:
    args = parse_args(argv)
    check_out_dir(args.out_dir, args.force)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / MARKER).write_text("made by scripts/demo/make_demo_data.py: it may rewrite this folder\n")
    if args.recipe == "derm":
        from scripts.demo.make_derm_demo import make_derm_demo
        return make_derm_demo(args.out_dir, num_images=args.num_images, image_size=args.image_size, seed=args.seed)
    if args.recipe == "ct":
        from scripts.demo.make_ct_demo import make_ct_demo
        size = args.image_size
        return make_ct_demo(args.out_dir, num_images=args.num_images, shape=(size // 2, size, size), seed=args.seed,
                            val_fraction=args.val_fraction, test_fraction=args.test_fraction)
    if args.recipe == "knee":
        from scripts.demo.make_knee_demo import make_knee_demo
        return make_knee_demo(args.out_dir, num_images=args.num_images, image_size=args.image_size,
                              seed=args.seed, val_fraction=args.val_fraction, test_fraction=args.test_fraction)
    out_dir: Path = args.out_dir
    img_dir = out_dir / "images"
    img_dir.mkdir(parents=True, exist_ok=True)

    rng = np.random.default_rng(args.seed)
    specs = [_sample_spec(rng, i) for i in range(args.num_images)]
    text_rng = np.random.default_rng([args.seed, 1])
    reports = [_report(s, text_rng) for s in specs]
    vqa = [_vqa(s, rep[0], text_rng) for s, rep in zip(specs, reports)]
    splits = _assign_splits(specs, args.val_fraction, args.test_fraction,
                            np.random.default_rng([args.seed, 2]))

    wanted = {f"{s['id']}.png" for s in specs}
    for stale in img_dir.glob("demo_*.png"):
        if stale.name not in wanted:
            stale.unlink()
    jobs = [(s, args.image_size, args.seed, str(img_dir / f"{s['id']}.png")) for s in specs]
    if args.num_workers > 1:
        with multiprocessing.Pool(args.num_workers) as pool:
            for _ in pool.imap_unordered(_render_to_file, jobs, chunksize=16):
                pass
    else:
        for job in jobs:
            _render_to_file(job)

    per_split = {k: {"stage0": [], "stage2": []} for k in ("train", "val", "test")}
    csv_rows = []
    abs_dir = out_dir.resolve()
    for spec, (findings_text, impression), qa, split in zip(specs, reports, vqa, splits):
        rel = f"images/{spec['id']}.png"
        labels = {n: int(n in spec["findings"]) for n in FINDING_NAMES}
        codes = [ICD10[n] for n in FINDING_NAMES if labels[n]]
        per_split[split]["stage0"].append({
            "image": rel, "caption": f"FINDINGS: {findings_text} IMPRESSION: {impression}",
            "labels": labels, "id": spec["id"], "icd10": codes, "details": spec["details"]})
        per_split[split]["stage2"].extend(qa)
        csv_rows.append([str(abs_dir / rel), findings_text, impression, split,
                         *[labels[n] for n in FINDING_NAMES], ";".join(codes), rel,
                         ";".join(n for n in FINDING_NAMES if labels[n])])

    # The quickstart trains its small SigLIP from scratch as a stand-in for a pretrained one.
    # A real pretrained text tower has seen short phrases as well as reports; one trained on
    # reports alone maps the zero-shot prompts ("pleural effusion" / "no pleural effusion")
    # nowhere useful. So its corpus adds, per image, one single-finding statement in that form.
    stmt_rng = np.random.default_rng([args.seed, 3])
    pretrain = []
    for row in per_split["train"]["stage0"]:
        f = FINDINGS[int(stmt_rng.integers(len(FINDINGS)))]
        text = f["positive_prompt"] if row["labels"][f["name"]] else f["negative_prompt"]
        pretrain += [row, {**row, "caption": text}]
    _write_json(out_dir / "pretrain_train.json", pretrain)

    for split, parts in per_split.items():
        _write_json(out_dir / f"stage0_{split}.json", parts["stage0"])
        _write_json(out_dir / f"stage1_{split}.json", parts["stage0"])
        _write_json(out_dir / f"stage2_{split}.json", parts["stage2"])
    with open(out_dir / "demo.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["img_path", "findings", "impression", "split", *FINDING_NAMES,
                         "icd10", "image", "labels"])
        writer.writerows(csv_rows)
    # The labelled recipe's example (seed 004's layout): demo.csv's `labels` column (the findings
    # present, ';'-separated) with these classes and their ICD-10 codes.
    with open(out_dir / "classes.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["condition", "description", "icd10"])
        writer.writerows([f["name"], f["display"].lower(), f["icd10"]] for f in FINDINGS)
    _write_json(out_dir / "findings.json", FINDINGS)
    (out_dir / "README.txt").write_text(_README.format(seed=args.seed, template=CLASS_PROMPT_TEMPLATE),
                                         encoding="utf-8")

    width = max(len(n) for n in FINDING_NAMES)
    print(f"Wrote {len(specs)} synthetic phantoms ({args.image_size} px) to {out_dir}")
    print(f"{'':{width}}  " + "  ".join(f"{k:>5}" for k in ("train", "val", "test")))
    for name in ["normal", *FINDING_NAMES]:
        cells = []
        for split in ("train", "val", "test"):
            rows = per_split[split]["stage0"]
            cells.append(sum((not any(r["labels"].values())) if name == "normal"
                             else r["labels"][name] for r in rows))
        print(f"{name:{width}}  " + "  ".join(f"{c:>5}" for c in cells))
    print(f"{'images':{width}}  " + "  ".join(f"{len(per_split[k]['stage0']):>5}"
                                          for k in ("train", "val", "test")))
    return out_dir


if __name__ == "__main__":
    main(sys.argv[1:])
