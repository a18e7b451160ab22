"""The shared training loop when things go wrong: a NaN/inf step is skipped on every process
together and a run of them stops with a checkpoint; SIGTERM/SIGUSR1 (to a launcher's process
group, as SLURM does, or to one trainer) stops every process after the same step with a
checkpoint that resumes to the uninterrupted run's weights; a save cut short leaves the
previous checkpoint; a loss that runs away gets one warning."""
import argparse
import json
import logging
import math
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from accelerator_setup import setup_accelerator_and_logging
from cli import add_common_args
from training.checkpoints import list_checkpoints, resume_from, save_checkpoint
from training.watch import DivergenceWatch

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled",
       "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT),
       "ACCELERATE_USE_CPU": "true"}  # what `accelerate launch --cpu` sets: gloo instead of NCCL


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    pass


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _metrics(out):
    path = Path(out) / "metrics.jsonl"
    rows = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line still being written
            pass
    return rows


def _same_safetensors(a, b):
    x, y = load_file(str(a)), load_file(str(b))
    assert x.keys() == y.keys()
    different = [k for k in x if not torch.equal(x[k], y[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


# ---------------------------------------------------------------- divergence that stays finite

def test_divergence_warning_fires_on_a_sustained_jump_only(caplog):
    rng = random.Random(0)
    caplog.set_level(logging.WARNING, logger="siglip_med")
    # A normal run: a steep, noisy start (x1000 in 20 steps), then a slow noisy decrease with
    # single spikes of 6x.
    watch = DivergenceWatch()
    normal = [500 * math.exp(-i / 3) + 8 * math.exp(-i / 80) + 0.3 for i in range(400)]
    normal = [v * math.exp(rng.gauss(0, 0.3)) * (6 if i % 97 == 50 else 1) for i, v in enumerate(normal)]
    assert not any(watch.update(i, v) for i, v in enumerate(normal))
    assert not caplog.records
    # One outlier of 30x, then back: not sustained, no warning.
    watch = DivergenceWatch()
    flat = [1.0 * math.exp(rng.gauss(0, 0.2)) for _ in range(60)]
    assert not any(watch.update(i, v) for i, v in enumerate(flat + [30.0] + flat[:5]))
    # Diverging: 30x the median for 3 logged steps in a row gives one warning, at the third.
    watch = DivergenceWatch()
    fired = [watch.update(i, v) for i, v in enumerate(flat + [30.0, 35.0, 40.0, 50.0, 60.0, 80.0])]
    assert fired.index(True) == 62 and fired.count(True) == 1
    msg = caplog.records[-1].getMessage()
    assert "step 62: loss 40 " in msg and "learning_rate" in msg
    assert f"its median {statistics.median((flat + [30.0, 35.0])[-50:]):.4g} " in msg
    # ... and once more only after the loss came back down and ran away again.
    assert not any(watch.update(100 + i, v) for i, v in enumerate(flat[:3]))
    assert [watch.update(200 + i, 60.0) for i in range(3)] == [False, False, True]


# ---------------------------------------------------------------- checkpoints cut short

def test_a_save_cut_short_leaves_the_previous_checkpoint(tmp_path, fresh_accelerator_state, monkeypatch, capsys):
    args = add_common_args(argparse.ArgumentParser()).parse_args(
        ["--output_dir", str(tmp_path), "--report_to", "none"])
    acc = setup_accelerator_and_logging(args)
    model = acc.prepare(torch.nn.Linear(2, 2))

    def save(step, limit=3):
        with torch.no_grad():
            model.weight.fill_(step)
        return save_checkpoint(acc, tmp_path, step, {"epoch": 0, "batches_done": step}, total_limit=limit)
    save(2)
    save(4)
    real = acc.save_state

    def crash(folder, **kw):  # the process dies after the first file of step 6
        real(folder, **kw)
        (Path(folder) / "model.safetensors").write_bytes(b"\0" * 10)
        raise KeyboardInterrupt("killed mid-save")
    monkeypatch.setattr(acc, "save_state", crash)
    with pytest.raises(KeyboardInterrupt):
        save(6)
    monkeypatch.setattr(acc, "save_state", real)
    root = tmp_path / "checkpoints"
    assert (root / ".tmp_step_6").is_dir() and [p.name for p in list_checkpoints(tmp_path)] == ["step_2", "step_4"]
    # A folder copied in part (no completion marker) and one with a truncated file, both newer.
    shutil.copytree(root / "step_4", root / "step_8")
    (root / "step_8" / "trainer_state.json").unlink()
    shutil.copytree(root / "step_4", root / "step_7")
    (root / "step_7" / "trainer_state.json").write_text(json.dumps({"step": 7, "epoch": 0, "batches_done": 7}))
    data = (root / "step_7" / "model.safetensors").read_bytes()
    (root / "step_7" / "model.safetensors").write_bytes(data[: len(data) // 2])
    with torch.no_grad():
        model.weight.zero_()
    capsys.readouterr()
    state = resume_from(acc, tmp_path, "latest")
    assert state["step"] == 4 and torch.all(model.weight == 4)
    warned = capsys.readouterr().err
    assert "step_8 is incomplete" in warned and "step_7 is damaged" in warned
    # The next save clears what the crash left and rotation keeps the newest complete ones.
    save(10, limit=2)
    assert not (root / ".tmp_step_6").exists()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_7", "step_10"]


# ---------------------------------------------------------------- non-finite steps

@pytest.mark.slow
def test_a_nan_on_one_process_is_skipped_by_both_and_a_signal_to_one_stops_both(tmp_path):
    """2 gloo processes through the shared OptimizerStep: an inf gradient from process 0 in
    window 1 and a NaN in process 0's loss alone in window 2 (its gradients stay finite, so
    only the flag all-reduce tells process 1); SIGUSR1 reaches process 1 alone in window 3.
    Both skip windows 1-2, step the others, and both stop after window 3 with one checkpoint."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(ROOT / "tests" / "engines" / "step_probe.py"),
           "--output_dir", str(tmp_path), "--report_to", "none", "--gradient_accumulation_steps", "2",
           "--windows", "8", "--bad_window", "1", "--nan_loss_window", "2", "--signal_window", "3",
           "--signal_rank", "1"]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"probe_rank{r}.json").read_text()) for r in (0, 1)]
    for r in ranks:
        assert r["applied"] == [True, False, False, True], r["applied"]
        assert r["steps_taken"] == r["updates"] == 2 and r["nonfinite_skipped"] == 2 and r["finite"]
    assert ranks[0]["weights"] == ranks[1]["weights"]
    assert [m["train/nonfinite_skipped"] for m in _metrics(tmp_path)] == [1, 2]
    assert "its samples" in proc.stderr and "process 0 (its loss is NaN/inf)" in proc.stderr
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_4"]
    assert "SIGUSR1 received: stopped after step 4" in proc.stderr


def test_fp16_scaler_goes_on_after_a_nan_loss_with_finite_gradients(tmp_path):
    """fp16 loss scaling (a GradScaler, as on a GPU): an inf gradient is skipped by the scaler,
    which halves its scale; a NaN loss whose gradients are finite is skipped without touching
    the scale, and the scaler's step is closed so the next one unscales normally."""
    cmd = [sys.executable, str(ROOT / "tests" / "engines" / "step_probe.py"), "--output_dir", str(tmp_path),
           "--report_to", "none", "--gradient_accumulation_steps", "2", "--cpu_grad_scaler", "--mixed_precision",
           "fp16", "--windows", "4", "--bad_window", "1", "--nan_loss_window", "2"]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads((tmp_path / "probe_rank0.json").read_text())
    assert r["applied"] == [True, False, False, True] and r["updates"] == 2 and r["finite"]
    assert r["scale"] == 2.0 ** 7 and r["nonfinite_skipped"] == 2


def _stage0_argv(model, data, out, **kw):
    argv = ["--model_name", str(model), "--train_json", str(data / "stage0_train.json"), "--image_root", str(data),
            "--output_dir", str(out), "--batch_size", "8", "--num_workers", "0", "--report_to", "none",
            "--learning_rate", "1e-3", "--warmup_steps", "2", "--logging_steps", "1", "--no-save_epoch_models"]
    for k, v in kw.items():
        argv += [f"--{k}"] + ([] if v is True else [str(v)])
    return argv


def test_nonfinite_steps_in_a_row_stop_with_a_checkpoint_and_the_rows(tiny_siglip, demo_dir, tmp_path, capsys,
                                                                       monkeypatch):
    """Stage0 with a loss that turns NaN from step 3 on: steps 3-5 are skipped (the first one
    names its samples' rows and the data file), then the run stops with a resume checkpoint,
    the causes in one line, and a non-zero exit."""
    import Stage0.trainer as stage0_trainer
    from Stage0.train_vision_encoder_stage0 import main
    real, calls = stage0_trainer.siglip_loss, []

    def planted(*a, **k):
        calls.append(1)
        return real(*a, **k) * (float("nan") if len(calls) >= 3 else 1.0)
    monkeypatch.setattr(stage0_trainer, "siglip_loss", planted)
    with pytest.raises(SystemExit) as stop:
        main(_stage0_argv(tiny_siglip, demo_dir, tmp_path, max_steps=20, max_nonfinite_steps=3, batch_size=16))
    message = stop.value.code
    assert isinstance(message, str) and message.startswith("error: 3 optimizer steps in a row (steps 3-5)")
    for part in ("--learning_rate", "--mixed_precision bf16", "bad data row", str(tmp_path / "checkpoints/step_5")):
        assert part in message
    assert "\n" not in message
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_5"]
    weights = load_file(str(tmp_path / "checkpoints" / "step_5" / "model.safetensors"))
    assert all(torch.isfinite(v).all() for v in weights.values())
    assert [m["train/nonfinite_skipped"] for m in _metrics(tmp_path) if "train/nonfinite_skipped" in m] == [1, 2, 3]
    err = capsys.readouterr().err
    first = next(line for line in err.splitlines() if "step 3: non-finite" in line)
    assert f"its samples in {demo_dir / 'stage0_train.json'}: process 0 (its loss is NaN/inf): row " in first
    rows = [int(r) for r in first.split(": row ", 1)[1].replace("row ", "").split(", ")]
    n_train = len(json.loads((demo_dir / "stage0_train.json").read_text()))
    assert len(set(rows)) == 16 and all(0 <= r < n_train for r in rows)
    assert "step 4: non-finite" in err and "its samples" not in err.split("step 4: non-finite")[1].splitlines()[0]


# ---------------------------------------------------------------- preemption

WRAPPER = """#!/bin/bash
# A trainer as its launcher starts it, recording its exit status. `trap :` lets the shell
# outlive the signal torchrun relays to the process group, to write that status.
trap : TERM USR1
"{python}" "{script}" "$@"
echo $? > "{out}/exit_status_rank$RANK"
"""


def _launch(tmp_path, argv, name):
    """`accelerate launch` with the committed DDP config on 2 CPU processes (gloo), in its own
    process group (as a job's), each trainer through a wrapper that records its exit status."""
    wrapper = tmp_path / "trainer.sh"
    if not wrapper.exists():
        wrapper.write_text(WRAPPER.format(python=sys.executable, out=tmp_path,
                                          script=ROOT / "Stage0" / "train_vision_encoder_stage0.py"))
        wrapper.chmod(0o755)
    for f in tmp_path.glob("exit_status_rank*"):
        f.unlink()
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file", "scripts/accelerate/ddp.yaml",
           "--num_processes", "2", "--main_process_port", str(_free_port()), "--no_python", str(wrapper), *argv]
    log = open(tmp_path / f"{name}.log", "w")
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**ENV, "RELIABILITY_RUN": str(tmp_path)}, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    return proc, tmp_path / f"{name}.log"


def _wait_for_step(proc, out, log, step, timeout=240):
    end = time.time() + timeout
    while time.time() < end:
        if any("train/loss" in m and m["step"] >= step for m in _metrics(out)):
            return
        assert proc.poll() is None, f"the run ended before step {step}:\n{log.read_text()[-3000:]}"
        time.sleep(0.02)
    pytest.fail(f"no step {step} within {timeout}s")


def test_the_multi_gpu_config_without_a_gpu_is_refused_in_one_line(tiny_siglip, demo_dir, tmp_path):
    """NUM_GPUS=2 on a machine without a GPU: accelerate started two processes that each trained
    alone (one process, CPU) into one output folder, and they raced over its checkpoints."""
    env = {k: v for k, v in ENV.items() if k != "ACCELERATE_USE_CPU"}
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file", "scripts/accelerate/ddp.yaml",
           "--num_processes", "2", "--main_process_port", str(_free_port()),
           str(ROOT / "Stage0" / "train_vision_encoder_stage0.py"),
           *_stage0_argv(tiny_siglip, demo_dir, tmp_path / "run", max_steps=2)]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0, out.stderr[-3000:]
    assert "error: 2 processes were launched, but each runs alone" in out.stderr, out.stderr[-3000:]
    assert "ACCELERATE_USE_CPU=true" in out.stderr  # (torch's agent then prints its own failure summary)
    assert not list_checkpoints(tmp_path / "run") and not (tmp_path / "run" / "args.json").exists()


def _trainer_pid(tmp_path, rank):
    """The Python trainer of `rank` in this test's launch (not its wrapper shell)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if (any(a.endswith(b"train_vision_encoder_stage0.py") for a in cmdline[:3])
                and f"RELIABILITY_RUN={tmp_path}".encode() in environ
                and (rank is None or f"RANK={rank}".encode() in environ)):
            return int(pid)
    raise AssertionError(f"no trainer process of rank {rank}")


def _exit_statuses(tmp_path):
    return [int((tmp_path / f"exit_status_rank{r}").read_text()) for r in (0, 1)]


@pytest.mark.slow
def test_sigterm_stops_2_process_stage0_with_a_checkpoint_that_resumes_exactly(tiny_siglip, demo_dir, tmp_path):
    """SIGTERM to the launcher's process group (as SLURM does; torchrun relays it to each
    trainer at its own moment), then, on the resumed run, to one trainer alone: each time both
    trainers stop after the same step with a checkpoint and exit 0, and the resumed run (LoRA,
    dropout on) stops with exactly the weights and optimizer state of a run never stopped."""
    run, ref = tmp_path / "run", tmp_path / "ref"
    flags = dict(max_steps=30, lora_r=4, seed=3)
    proc, log = _launch(tmp_path, _stage0_argv(tiny_siglip, demo_dir, run, **flags), "group")
    _wait_for_step(proc, run, log, 3)
    os.killpg(proc.pid, signal.SIGTERM)
    # `accelerate launch` run by hand gets the signal too: torch's elastic agent re-raises it
    # once its trainers have stopped (128 + SIGTERM = 143, or 1 from an older accelerate). The
    # project's launchers keep the signal from it and exit 0 (test_preemption_workers.py).
    assert proc.wait(timeout=120) in (0, 1, 143), log.read_text()[-3000:]
    text = log.read_text()
    assert _exit_statuses(tmp_path) == [0, 0], text[-3000:]
    s1 = int(list_checkpoints(run)[-1].name[5:])
    assert len(list_checkpoints(run)) == 1 and 3 <= s1 < 30
    assert f"SIGTERM received: stopped after step {s1} " in text and "SIGKILL" not in text
    assert not (run / "final_model").exists()

    proc, log = _launch(tmp_path, _stage0_argv(tiny_siglip, demo_dir, run, resume_from_checkpoint="latest", **flags),
                        "one_trainer")
    _wait_for_step(proc, run, log, s1 + 2)
    os.kill(_trainer_pid(tmp_path, 1), signal.SIGTERM)
    assert proc.wait(timeout=120) == 0, log.read_text()[-3000:]
    assert _exit_statuses(tmp_path) == [0, 0]
    s2 = int(list_checkpoints(run)[-1].name[5:])
    assert s1 + 2 <= s2 < 30 and f"SIGTERM received: stopped after step {s2} " in log.read_text()
    assert not (run / "final_model").exists()

    # The run that was never stopped, with a checkpoint at the step the resumed one stopped.
    proc, log = _launch(tmp_path, _stage0_argv(tiny_siglip, demo_dir, ref, checkpointing_steps=s2,
                                               checkpoints_total_limit=100, **flags), "reference")
    assert proc.wait(timeout=240) == 0, log.read_text()[-3000:]
    stopped, uninterrupted = run / "checkpoints" / f"step_{s2}", ref / "checkpoints" / f"step_{s2}"
    _same_safetensors(stopped / "model.safetensors", uninterrupted / "model.safetensors")
    a, b = (torch.load(d / "optimizer.bin", weights_only=True)["state"] for d in (stopped, uninterrupted))
    assert a.keys() == b.keys() and all(torch.equal(a[k][n], b[k][n]) for k in a for n in a[k])


@pytest.mark.slow
def test_sigterm_to_the_one_process_launcher_alone_stops_its_trainer_with_a_checkpoint(tiny_siglip, demo_dir,
                                                                                         tmp_path):
    """accelerate's one-process launcher neither relays a signal nor stops its child: killing it
    alone used to orphan the trainer, which trained on. Now the trainer checkpoints and exits."""
    run = tmp_path / "run"
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file", "scripts/accelerate/single.yaml",
           str(ROOT / "Stage0" / "train_vision_encoder_stage0.py"), *_stage0_argv(tiny_siglip, demo_dir, run,
                                                                                  max_steps=200)]
    log_path = tmp_path / "single.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env={**ENV, "RELIABILITY_RUN": str(tmp_path)}, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_for_step(proc, run, log_path, 2)
        trainer = _trainer_pid(tmp_path, None)
        proc.send_signal(signal.SIGTERM)  # the launcher only, not its process group
        proc.wait(timeout=60)
        end = time.time() + 120
        while Path(f"/proc/{trainer}").exists() and time.time() < end:
            time.sleep(0.1)
        assert not Path(f"/proc/{trainer}").exists(), "the trainer outlived its launcher"
    finally:
        os.killpg(proc.pid, signal.SIGKILL) if proc.poll() is None else None
    text = log_path.read_text()
    steps = [int(p.name[5:]) for p in list_checkpoints(run)]
    assert steps and 2 <= steps[-1] < 200, text[-3000:]
    assert f"SIGTERM received: stopped after step {steps[-1]} " in text


def tiny_vlm_parts(root, demo_dir, n_rows) -> dict:
    """Config-built towers (no download, no pretraining) over the first n_rows Stage 2 rows:
    {"root", "siglip", "gemma3"}, the rows in root/train.json."""
    from scripts.demo.make_tiny_models import _texts_from_files, build_tiny_gemma3, build_tiny_siglip
    rows = json.loads((demo_dir / "stage2_train.json").read_text())[:n_rows]
    (root / "train.json").write_text(json.dumps(rows))
    texts = _texts_from_files([root / "train.json"])
    siglip = build_tiny_siglip(root / "siglip", texts, image_size=32, patch_size=16, hidden_size=32, num_layers=1,
                               num_heads=2, vocab_size=300)
    gemma = build_tiny_gemma3(root / "gemma3", texts, hidden_size=32, num_layers=1, num_heads=2, vocab_size=300)
    return {"root": root, "siglip": siglip, "gemma3": gemma}


@pytest.fixture(scope="module")
def vlm_parts(tmp_path_factory, demo_dir):
    """tiny_vlm_parts and a Stage 1 folder to start from."""
    from vlm import build_vlm, save_vlm
    parts = tiny_vlm_parts(tmp_path_factory.mktemp("vlm"), demo_dir, 16)
    torch.manual_seed(1)
    stage1 = save_vlm(*build_vlm(parts["siglip"], parts["gemma3"]), parts["root"] / "stage1" / "final_model")
    return {**parts, "stage1": stage1}


def test_sigterm_stops_stage2_with_a_checkpoint_that_resumes_exactly(vlm_parts, demo_dir, tmp_path, monkeypatch,
                                                                    fresh_accelerator_state):
    """SIGTERM to a running Stage2 training (LoRA, and the vision tower trained in epoch 1
    only) in epoch 2: it finishes the step, writes a checkpoint and exits 0; resumed with
    `latest` it ends with the weights of the run that was never stopped."""
    from Stage2.train_vqa_stage2 import main
    p, handler = vlm_parts, signal.getsignal(signal.SIGTERM)

    def argv(out, *extra):
        return ["--image_root", str(demo_dir), "--train_json", str(p["root"] / "train.json"), "--output_dir", str(out),
                "--vision_model_name", str(p["siglip"]), "--llm_name", str(p["gemma3"]), "--stage1_projector_path",
                str(p["stage1"]), "--batch_size", "4", "--learning_rate", "2e-3", "--num_epochs", "2",
                "--num_workers", "0", "--report_to", "none", "--max_a_len", "12", "--warmup_steps", "1",
                "--logging_steps", "1", "--no-save_every_epoch", "--lora_r", "4", "--train_ve_first_epoch", *extra]
    main(argv(tmp_path / "ref"))
    import training.watch
    real = training.watch.log_metrics

    def signal_at_step_6(acc, metrics, step):
        real(acc, metrics, step)
        if "train/loss" in metrics and step == 6:  # in epoch 2 (4 steps an epoch)
            os.kill(os.getpid(), signal.SIGTERM)
    monkeypatch.setattr(training.watch, "log_metrics", signal_at_step_6)
    with pytest.raises(SystemExit) as stop:
        main(argv(tmp_path / "run"))
    assert stop.value.code == 0
    assert [c.name for c in list_checkpoints(tmp_path / "run")] == ["step_4", "step_7"]  # epoch 1's, and the stop's
    assert not (tmp_path / "run" / "final_model").exists()
    assert signal.getsignal(signal.SIGTERM) is handler  # the handlers are put back
    monkeypatch.setattr(training.watch, "log_metrics", real)
    resumed = main(argv(tmp_path / "run", "--resume_from_checkpoint", "latest"))
    assert resumed.results["step"] == 8
    for f in ("model.safetensors", "vision_tower/model.safetensors", "lora_adapter/adapter_model.safetensors"):
        _same_safetensors(tmp_path / "run" / "final_model" / f, tmp_path / "ref" / "final_model" / f)
    batch = next(iter(resumed.train_loader))
    assert "index" in batch  # a non-finite step can name its rows


# Loaded by every Python process of a launch: the trainer process, instead of training, installs
# the project's Preemption handler, says it is ready and waits for a stop signal.
TRAINER_STAND_IN = """
import os, sys, time
if sys.argv and sys.argv[0].endswith(("train_vision_encoder_stage0.py", "train_projection_stage1.py",
                                      "train_vqa_stage2.py")):
    from training.preemption import Preemption
    p = Preemption().install()
    out = os.environ["RELAY_TEST_DIR"]
    open(os.path.join(out, f"ready_{os.getpid()}"), "w").close()
    for _ in range(1200):
        if p.received:
            with open(os.path.join(out, f"got_{os.getpid()}"), "w") as f:
                f.write(str(p.received))
            os._exit(0)  # (sys.exit is fatal while site is importing)
        time.sleep(0.05)
    os._exit(3)
"""


@pytest.mark.slow
@pytest.mark.parametrize("launcher,num_gpus", [("Stage0/run_train_vision_encoder_stage0.sh", 2),
                                               ("scripts/run_stage1.sh", 1), ("scripts/run_stage2.sh", 1),
                                               ("scripts/run_knee_raddino.sh", 1), ("scripts/run_ct_clip.sh", 1),
                                               ("scripts/run_derm_lora.sh", 1)])
def test_every_launcher_relays_sigusr1_to_its_trainers(launcher, num_gpus, tmp_path):
    """SLURM's `--signal=USR1@120` reaches the launcher's process group; torch's launcher
    relays only SIGTERM/SIGINT by default, and accelerate's one-process launcher none. Through
    the real `accelerate launch`, each launcher must hand the signal to every trainer's
    Preemption handler and exit 0 once they have stopped."""
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(TRAINER_STAND_IN)
    env = {**ENV, "PYTHONPATH": f"{tmp_path / 'site'}:{ROOT}", "RELAY_TEST_DIR": str(tmp_path),
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "NUM_GPUS": str(num_gpus),
           "OUTPUT_DIR": str(tmp_path / "out")}
    proc = subprocess.Popen(["bash", launcher], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    end = time.time() + 120
    while len(list(tmp_path.glob("ready_*"))) < num_gpus:
        assert proc.poll() is None and time.time() < end, proc.communicate()[0][-3000:]
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGUSR1)
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode == 0, out[-3000:]
    got = [int(f.read_text()) for f in tmp_path.glob("got_*")]
    assert got == [int(signal.SIGUSR1)] * num_gpus, out[-3000:]
