import importlib.metadata
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from image_loader import ImageLoadError, load_image, resolve_image_path  # noqa: E402

pydicom = pytest.importorskip("pydicom")


def _testdata(name):
    """A pydicom test file, from pydicom itself or the pinned pydicom-data package."""
    from pydicom.data import get_testdata_file

    found = get_testdata_file(name, download=False)
    if found:
        return Path(found)
    try:
        dist = importlib.metadata.distribution("pydicom-data")
    except importlib.metadata.PackageNotFoundError:
        pytest.fail("pydicom-data is not installed; pip install -r requirements-dev.txt")
    for f in dist.files or []:
        if f.name == name:
            return Path(dist.locate_file(f))
    pytest.fail(f"{name} not found in pydicom or pydicom-data")


# ----------------------------------------------------------------- PNG / JPEG

def test_8bit_grayscale_png_keeps_values_and_replicates_channels(tmp_path):
    arr = np.arange(256, dtype=np.uint8).reshape(16, 16)
    p = tmp_path / "gray.png"
    Image.fromarray(arr).save(p)
    im = load_image(p)
    out = np.asarray(im)
    assert im.mode == "RGB" and im.size == (16, 16)
    for c in range(3):
        np.testing.assert_array_equal(out[:, :, c], arr)


def test_16bit_png_is_stretched_to_full_range_monotonically(tmp_path):
    ramp = np.tile(np.linspace(1000, 5000, 64).astype(np.uint16), (8, 1))
    src = Image.fromarray(ramp)
    assert src.mode == "I;16"
    p = tmp_path / "ramp16.png"
    src.save(p)
    out = np.asarray(load_image(p))
    assert out.dtype == np.uint8
    assert out.min() == 0 and out.max() == 255
    row = out[0, :, 0].astype(int)
    assert np.all(np.diff(row) >= 0)
    assert len(np.unique(row)) > 50  # not collapsed by a naive 16->8 bit cast
    assert (out[:, :, 0] == out[:, :, 1]).all() and (out[:, :, 1] == out[:, :, 2]).all()


def test_constant_16bit_png_maps_to_zero(tmp_path):
    p = tmp_path / "flat16.png"
    Image.fromarray(np.full((8, 8), 1234, dtype=np.uint16)).save(p)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a 0/0 would warn
        out = np.asarray(load_image(p))
    assert (out == 0).all()


def test_rgb_jpeg(tmp_path):
    arr = np.zeros((32, 64, 3), dtype=np.uint8)
    arr[:, :32] = (220, 20, 20)
    arr[:, 32:] = (20, 20, 220)
    p = tmp_path / "colour.jpg"
    Image.fromarray(arr).save(p, quality=95)
    out = np.asarray(load_image(p)).astype(int)
    assert out.shape == (32, 64, 3)
    left, right = out[8:24, 4:28].mean((0, 1)), out[8:24, 36:60].mean((0, 1))
    assert left[0] > 180 and left[2] < 60
    assert right[2] > 180 and right[0] < 60


def test_rgba_png_drops_alpha_without_compositing(tmp_path):
    arr = np.zeros((4, 4, 4), dtype=np.uint8)
    arr[..., :3] = (10, 200, 30)
    arr[..., 3] = 0  # fully transparent: compositing onto black would give zeros
    p = tmp_path / "rgba.png"
    Image.fromarray(arr, mode="RGBA").save(p)
    im = load_image(p)
    assert im.mode == "RGB"
    assert (np.asarray(im) == (10, 200, 30)).all()


def test_truncated_png_raises_with_path_row_and_source(tmp_path):
    p = tmp_path / "cut.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (128, 128), dtype=np.uint8)).save(p)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageLoadError) as e:
        load_image(p, row=7, source="train.json")
    msg = str(e.value)
    assert str(p) in msg and "row 7" in msg and "train.json" in msg
    assert "re-export" in msg.lower()


def test_text_file_renamed_png_raises(tmp_path):
    p = tmp_path / "notes.png"
    p.write_text("this is not an image\n")
    with pytest.raises(ImageLoadError, match="notes.png"):
        load_image(p)
    with pytest.raises(ImageLoadError) as e:
        load_image(p, row=7, source="train.json")
    assert "row 7 of train.json" in str(e.value)


def test_error_is_a_value_error_and_keeps_context(tmp_path):
    with pytest.raises(ValueError) as e:
        load_image(tmp_path / "nope.png", row=3, source="val.csv")
    assert isinstance(e.value, ImageLoadError)
    assert e.value.row == 3 and e.value.source == "val.csv"
    assert "nope.png" in str(e.value)


# ----------------------------------------------------------------- resolve_image_path

def test_resolve_joins_relative_paths_and_keeps_absolute(tmp_path):
    (tmp_path / "images").mkdir()
    f = tmp_path / "images" / "a.png"
    Image.new("L", (2, 2)).save(f)
    assert resolve_image_path("images/a.png", tmp_path) == f
    assert resolve_image_path(str(f), "/somewhere/else") == f
    assert resolve_image_path(str(f), None) == f
    assert resolve_image_path(str(f), "") == f


def test_resolve_missing_file_names_path_row_and_image_root(tmp_path):
    with pytest.raises(ImageLoadError) as e:
        resolve_image_path("images/missing.png", tmp_path, row=12, source="stage0_train.json")
    msg = str(e.value)
    assert str(tmp_path / "images" / "missing.png") in msg
    assert "--image_root" in msg
    assert "row 12 of stage0_train.json" in msg


# ----------------------------------------------------------------- DICOM

def _lung_vs_mediastinum(arr):
    """Means of a central strip over the spine and of the two mid-lung fields."""
    h, w = arr.shape[:2]
    g = arr[..., 0].astype(float)

    def box(x0, x1, y0, y1):
        return g[int(y0 * h):int(y1 * h), int(x0 * w):int(x1 * w)].mean()

    spine = box(0.46, 0.54, 0.20, 0.64)
    return spine, box(0.16, 0.35, 0.26, 0.51), box(0.65, 0.84, 0.26, 0.51)


@pytest.fixture(scope="module")
def rg1_path():
    return _testdata("RG1_UNCR.dcm")


def test_monochrome1_chest_radiograph_has_dark_lungs(rg1_path):
    ds = pydicom.dcmread(rg1_path)
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    assert (ds.Rows, ds.Columns) == (1955, 1841)
    im = load_image(rg1_path)
    assert im.mode == "RGB" and im.size == (1841, 1955)
    arr = np.asarray(im)
    assert arr.min() == 0 and arr.max() == 255
    spine, lung_l, lung_r = _lung_vs_mediastinum(arr)
    assert lung_l < spine - 40 and lung_r < spine - 40


def test_without_monochrome1_inversion_lungs_would_be_bright(rg1_path, tmp_path):
    # Same pixels, labelled MONOCHROME2: the loader must no longer invert, and the
    # lungs come out brighter than the spine. This pins the inversion as the reason
    # the previous test passes.
    ds = pydicom.dcmread(rg1_path)
    ds.PhotometricInterpretation = "MONOCHROME2"
    p = tmp_path / "rg1_mono2.dcm"
    ds.save_as(p)
    spine, lung_l, lung_r = _lung_vs_mediastinum(np.asarray(load_image(p)))
    assert lung_l > spine + 40 and lung_r > spine + 40


def test_dicom_detected_by_magic_bytes_without_extension(rg1_path, tmp_path):
    p = tmp_path / "IM0001"
    shutil.copy(rg1_path, p)
    assert load_image(p).size == (1841, 1955)


def test_truncated_dicom_raises(rg1_path, tmp_path):
    p = tmp_path / "cut.dcm"
    p.write_bytes(rg1_path.read_bytes()[:200_000])
    with pytest.raises(ImageLoadError) as e:
        load_image(p, row=2, source="demo.csv")
    assert "cut.dcm" in str(e.value) and "row 2 of demo.csv" in str(e.value)


def test_jpeg2000_dicom_decodes_or_names_a_package():
    p = _testdata("RG1_J2KR.dcm")
    try:
        im = load_image(p)
    except ImageLoadError as e:
        assert "pip install" in str(e) and "pylibjpeg-openjpeg" in str(e)
        return
    pytest.skip(f"a JPEG 2000 decoder is installed here (decoded to {im.size})")


def test_undecodable_jpeg_lossless_dicom_names_a_package():
    p = _testdata("JPEG-LL.dcm")
    try:
        load_image(p)
    except ImageLoadError as e:
        assert "JPEG-LL.dcm" in str(e)
        assert "pip install" in str(e) and "pylibjpeg-libjpeg" in str(e)
        return
    pytest.skip("a JPEG lossless decoder is installed here")


def test_multiframe_dicom_uses_first_frame_and_warns():
    p = _testdata("emri_small.dcm")
    frames = pydicom.dcmread(p).pixel_array
    assert frames.ndim == 3
    with pytest.warns(UserWarning, match="first frame"):
        im = load_image(p)
    out = np.asarray(im)[..., 0].astype(float)
    first = frames[0].astype(float)
    # Same image up to the monotone 8-bit stretch: the ranks agree.
    assert np.corrcoef(out.ravel(), first.ravel())[0, 1] > 0.99


def test_rgb_dicom():
    im = load_image(_testdata("SC_rgb.dcm"))
    arr = np.asarray(im)
    assert im.mode == "RGB" and arr.shape == (100, 100, 3)
    assert not (arr[..., 0] == arr[..., 1]).all()  # colour survived
