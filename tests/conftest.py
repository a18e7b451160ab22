import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# Tests never reach a model hub; anything that tries fails fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: real-asset tests (packaged Gemma 3 270M); run in CI")


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory):
    """A small copy of the embedded demo data set (synthetic phantoms with known findings)."""
    from scripts.make_demo_data import main as make_demo
    out = tmp_path_factory.mktemp("demo")
    make_demo(["--out_dir", str(out), "--num_images", "300", "--image_size", "96", "--seed", "0",
               "--num_workers", "1"])
    return out


def short_caption(labels: dict) -> str:
    """A canonical caption per finding set: retrieval on it has a known right answer."""
    present = [k.replace("_", " ") for k, v in sorted(labels.items()) if v]
    return ", ".join(present) if present else "no acute finding"


@pytest.fixture(scope="session")
def short_caption_jsons(demo_dir):
    out = {}
    for split in ("train", "val", "test"):
        rows = json.loads((demo_dir / f"stage0_{split}.json").read_text())
        for r in rows:
            r["caption"] = short_caption(r["labels"])
        out[split] = demo_dir / f"short_{split}.json"
        out[split].write_text(json.dumps(rows))
    return out


@pytest.fixture(scope="session")
def tiny_siglip(tmp_path_factory, demo_dir):
    from scripts.make_tiny_models import _texts_from_files, build_tiny_siglip
    texts = _texts_from_files([demo_dir / "stage0_train.json"]) + ["no acute finding, cardiomegaly"]
    return build_tiny_siglip(tmp_path_factory.mktemp("tiny") / "siglip", texts, image_size=64,
                             hidden_size=64, num_layers=2, num_heads=2)


@pytest.fixture
def fresh_accelerator_state():
    """For tests that build an Accelerator with another precision than earlier ones in this
    process (accelerate keeps one global state)."""
    from accelerate.state import AcceleratorState, GradientState
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
