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


def run_launcher(script, tmp_path, **env):
    """A launcher run as a user runs it, with a stand-in `accelerate` first on PATH that prints
    its arguments as JSON: the finished process (no bash is re-implemented)."""
    import subprocess
    fake = tmp_path / "bin"
    fake.mkdir(exist_ok=True)
    (fake / "accelerate").write_text('#!/usr/bin/env python3\nimport json, sys\nprint(json.dumps(sys.argv[1:]))\n')
    (fake / "accelerate").chmod(0o755)
    return subprocess.run(["bash", str(ROOT / script)], env={**os.environ, "PATH": f"{fake}:{os.environ['PATH']}",
                                                            **env}, capture_output=True, text=True)


def launcher_argv(proc) -> tuple[list[str], list[str]]:
    """(accelerate's own arguments, the trainer's) from a run_launcher process."""
    argv = json.loads(proc.stdout.strip().splitlines()[-1])
    script = next(i for i, a in enumerate(argv) if a.endswith(".py"))
    return argv[:script], argv[script + 1:]


def launch_argv(script, tmp_path, **env) -> list[str]:
    """The trainer's argv as the launcher builds it."""
    proc = run_launcher(script, tmp_path, **env)
    assert proc.returncode == 0, proc.stderr
    return launcher_argv(proc)[1]


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: real-asset runs, multi-process and preemption drills, long learning "
                                       "runs; left out of scripts/test.sh by default, run in CI")


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory):
    """A small copy of the embedded demo data set (synthetic phantoms with known findings)."""
    from scripts.demo.make_demo_data import main as make_demo
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
    from scripts.demo.make_tiny_models import _texts_from_files, build_tiny_siglip
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


def accelerate_two_processes(script: str, argv, timeout: int = 600, site: Path | None = None,
                             config: str = "scripts/accelerate/ddp.yaml"):
    """`accelerate launch` with the committed DDP config (or another, `config`) on 2 CPU
    processes (gloo), as a user runs it; returns the finished process (stdout and stderr together
    in .stdout). `site`: a folder put first on PYTHONPATH (a sitecustomize.py there runs in
    every process)."""
    import socket
    import subprocess
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{site}:{ROOT}" if site else str(ROOT),
           "ACCELERATE_USE_CPU": "true"}  # what `accelerate launch --cpu` sets: gloo instead of NCCL
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file", config,
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


# ---------------------------------------------------------------- hub-shaped stand-ins
# Tiny models saved the way the checkpoints users start from ship: the properties that change
# what the code does (stored dtype, generation config, chat template, tokenizer class and
# length, image processor, adapter by hub id, checkpoint key names), at a size built in seconds.

@pytest.fixture(scope="session")
def hub_texts(demo_dir):
    from scripts.demo.make_tiny_models import _texts_from_files
    return _texts_from_files([demo_dir / f"stage{n}_train.json" for n in (0, 1, 2)])


@pytest.fixture(scope="session")
def hub_gemma3_it(tmp_path_factory, hub_texts):
    """google/gemma-3-*-it's shape: bf16 weights, sampling generation_config.json
    (top-k 64, top-p 0.95, eos [<eos>, <end_of_turn>]), Gemma's chat template."""
    from scripts.demo.make_tiny_models import build_tiny_gemma3
    return build_tiny_gemma3(tmp_path_factory.mktemp("hub") / "gemma-3-it", hub_texts, hidden_size=64,
                             num_layers=2, num_heads=2, vocab_size=400, hub_shaped=True)


@pytest.fixture(scope="session")
def hub_siglip(tmp_path_factory, hub_texts):
    """A SigLIP with google/siglip-*'s sentencepiece SiglipTokenizer and 64-token text length,
    bf16 weights."""
    from scripts.demo.make_tiny_models import build_tiny_siglip
    return build_tiny_siglip(tmp_path_factory.mktemp("hub") / "siglip", hub_texts, image_size=64,
                             hidden_size=64, num_layers=2, num_heads=2, hub_shaped=True)


@pytest.fixture(scope="session")
def hub_medsiglip(tmp_path_factory, hub_texts):
    """google/medsiglip-448's shape, narrow and one layer deep: a SiglipModel at 448 px with
    14 px patches (1024 image tokens), a 64-token text tower with the sentencepiece
    SiglipTokenizer, weights stored in fp32 as the hub stores them, and the hub's
    preprocessor_config.json (SiglipImageProcessor, 448 x 448, bicubic, mean = std = 0.5)."""
    import torch

    from scripts.demo.make_tiny_models import build_tiny_siglip
    return build_tiny_siglip(tmp_path_factory.mktemp("hub") / "medsiglip-448", hub_texts, image_size=448,
                             patch_size=14, hidden_size=32, num_layers=1, num_heads=2, hub_shaped=True,
                             dtype=torch.float32)


@pytest.fixture(scope="session")
def hub_raddino(tmp_path_factory):
    """A DINOv2 with microsoft/rad-dino's patch size, 518 px position table and processor."""
    from scripts.demo.make_tiny_models import build_tiny_dinov2
    return build_tiny_dinov2(tmp_path_factory.mktemp("hub") / "rad-dino", hidden_size=32, num_layers=1,
                             num_heads=2, hub_shaped=True)


@pytest.fixture(scope="session")
def hub_llm2vec(tmp_path_factory, hub_texts):
    """An LLM2Vec MNTP adapter on a Llama 3-shaped bf16 base: dict with `adapter_id`, `base_id`,
    `cache_dir` (a Hugging Face cache holding both ids), `adapter_dir` and `base_dir` (the same
    folders, local). Use `hub_cache` to make the ids resolve."""
    from scripts.demo.make_tiny_models import build_hub_llm2vec
    return build_hub_llm2vec(tmp_path_factory.mktemp("hub") / "llm2vec", hub_texts)


@pytest.fixture
def hub_cache(hub_llm2vec, monkeypatch):
    """HF_HUB_CACHE -> the hub-shaped cache, in this process (huggingface_hub reads the variable
    once, at import) and for subprocesses."""
    import huggingface_hub.constants
    cache = str(hub_llm2vec["cache_dir"])
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", cache)
    monkeypatch.setenv("HF_HUB_CACHE", cache)
    return hub_llm2vec


@pytest.fixture(scope="session")
def hub_merlin_ckpt(tmp_path_factory):
    """A Merlin checkpoint file with the official release's keys (`encode_image.i3_resnet.*`
    and `encode_text.*`, one flat state dict), for an I3ResNet with one block per stage and
    width 8 (`--merlin_layers 1 1 1 1 --merlin_width 8`)."""
    from scripts.demo.make_tiny_models import build_merlin_checkpoint
    return build_merlin_checkpoint(tmp_path_factory.mktemp("hub") / "merlin" / "merlin_official.pt")


def stage2_demo_32px(root: Path) -> Path:
    """Demo data at 32 px for the Stage 2 tests (1500 phantoms; 5% val, 10% test) in root/demo:
    closed_{train,val}.json hold the yes/no questions (the learning tests), small_{train,val,test}.json
    48/16/24 mixed rows (closed, location and open answers) for the mechanics tests."""
    from scripts.demo.make_demo_data import main as make_demo_data
    data = root / "demo"
    make_demo_data(["--out_dir", str(data), "--num_images", "1500", "--image_size", "32", "--seed", "3",
                    "--val_fraction", "0.05", "--test_fraction", "0.1", "--num_workers", "1"])
    splits = {s: json.loads((data / f"stage2_{s}.json").read_text()) for s in ("train", "val", "test")}
    for s in ("train", "val"):
        (data / f"closed_{s}.json").write_text(json.dumps([r for r in splits[s] if r["question_type"] == "closed"]))
    for s, n in (("train", 48), ("val", 16), ("test", 24)):
        (data / f"small_{s}.json").write_text(json.dumps(splits[s][:n]))
    return data


def assert_same_training(one, two, steps: int) -> tuple[list, list]:
    """Two runs' metrics.jsonl (one process, and two processes on the same union batch) log the
    same `steps` train losses and gradient norms; returns their validation losses (one, two)."""
    rows = [[json.loads(line) for line in (Path(d) / "metrics.jsonl").read_text().splitlines()] for d in (one, two)]
    train_one, train_two = ([r for r in rs if "train/loss" in r] for rs in rows)
    assert len(train_one) == len(train_two) == steps
    for a, b in zip(train_one, train_two):
        assert b["train/loss"] == pytest.approx(a["train/loss"], rel=1e-4)
        assert b["train/grad_norm"] == pytest.approx(a["train/grad_norm"], rel=1e-3)
    return tuple([r["val/loss"] for r in rs if "val/loss" in r] for rs in rows)

