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


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on a shared 2-core machine: several threads only wait on each other."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


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


def accelerate_two_processes(script: str, argv, timeout: int = 600):
    """`accelerate launch` with the committed DDP config on 2 CPU processes (gloo), as a user
    runs it; returns the finished process (stdout and stderr together in .stdout)."""
    import socket
    import subprocess
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
           "ACCELERATE_USE_CPU": "true"}  # what `accelerate launch --cpu` sets: gloo instead of NCCL
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file", "scripts/accelerate/ddp.yaml",
           "--num_processes", "2", "--main_process_port", str(port), script, *map(str, argv)]
    return subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=timeout)


def assert_sharded_run(proc, out, train_rows: int, batch_size: int, epochs: int = 1, drop_last: bool = True):
    """A 2-process run: it finished, each process trained on its half of the data (an epoch is
    half the single-process steps, not all of them twice), and one process wrote the logs."""
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert "processes=2" in proc.stdout
    out = Path(out)
    assert json.loads((out / "args.json").read_text())["num_processes"] == 2
    per_epoch = train_rows // (2 * batch_size) if drop_last else -(-train_rows // (2 * batch_size))
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [m["step"] for m in logged if "train/loss" in m]
    assert steps and len(steps) == len(set(steps)), steps  # one writer
    assert abs(steps[-1] - per_epoch * epochs) <= epochs, (steps[-1], per_epoch, epochs)
    assert (out / "final_model").is_dir()
