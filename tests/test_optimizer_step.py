"""The one optimizer step every trainer shares: fp16 overflow, accumulation windows and the
distributed engines (issue: fp16 crashed with `unscale_() has already been called`, DeepSpeed
stepped on every micro-batch and its float grad norm broke the non-finite check)."""
import argparse
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from accelerate.utils import DistributedType

import accelerator_setup
from accelerator_setup import check_engine, setup_accelerator_and_logging
from cli import add_common_args
from training.step import OptimizerStep

ROOT = Path(__file__).resolve().parents[1]
PROBE = ROOT / "tests" / "engines" / "step_probe.py"


pytestmark = pytest.mark.usefixtures("fresh_accelerator_state")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _probe(out, *extra, processes=1):
    out.mkdir(parents=True, exist_ok=True)
    argv = [str(PROBE), "--output_dir", str(out), "--report_to", "none", "--gradient_accumulation_steps", "2",
            *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    if processes > 1:
        env["ACCELERATE_USE_CPU"] = "true"  # gloo, as `accelerate launch --cpu`
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
               "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), *argv]
    else:
        cmd = [sys.executable, *argv]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads((out / f"probe_rank{r}.json").read_text()) for r in range(processes)], proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["one process", "one process, fp16 GradScaler", "DDP, 2 processes",
                                    "DDP, 2 processes, fp16 GradScaler"])
def test_planted_inf_skips_one_window_and_training_goes_on(engine, tmp_path):
    """4 windows of 2 micro-batches, an inf loss on one process in window 1: that window is
    skipped on every process (through the scaler under fp16), the other 3 each step exactly
    once, and the weights stay finite and identical across processes."""
    extra = ["--cpu_grad_scaler", "--mixed_precision", "fp16"] if "fp16" in engine else []
    n = 2 if "DDP" in engine else 1
    ranks, log = _probe(tmp_path, *extra, processes=n)
    for r in ranks:
        assert r["applied"] == [True, False, True, True]
        assert r["updates"] == 3 and r["steps_taken"] == 3, r
        assert r["finite"]
        assert not torch.isfinite(torch.tensor(r["grad_norms"][1]))
        assert all(torch.isfinite(torch.tensor(r["grad_norms"][i])) for i in (0, 2, 3))
    if "fp16" in engine:
        assert ranks[0]["scale"] == 2.0 ** 7, "the scaler must halve its scale on the overflow"
        assert "scaler skips the update" in log
    assert all(r["weights"] == ranks[0]["weights"] for r in ranks)


def test_fp16_scaler_overflow_today_crashes_the_naive_skip():
    """The bug this guards against, reproduced: skipping optimizer.step() on an inf norm under a
    GradScaler leaves the scaler's state behind and the next unscale raises."""
    from accelerate import Accelerator
    acc = Accelerator(mixed_precision="fp16", cpu=True)
    acc.scaler, acc.native_amp = torch.amp.GradScaler("cpu", init_scale=256.0), True
    m = torch.nn.Linear(2, 1)
    m, o = acc.prepare(m, torch.optim.AdamW(m.parameters()))
    stepper = OptimizerStep(acc, o, m, m.parameters(), 1.0)
    for w in range(3):  # the shared step goes on where the naive loop raised
        stepper.backward(m(torch.ones(1, 2)).sum() * (float("inf") if w == 1 else 1.0))
        stepper.finish(w)
    assert stepper.steps_taken == 2


class _FakeDeepSpeedAccelerator:
    """What OptimizerStep sees under DeepSpeed: a float norm, an engine that already stepped."""
    distributed_type = DistributedType.DEEPSPEED
    scaler = None
    gradient_accumulation_steps = 4

    def __init__(self, norm):
        self.norm, self.backward_losses = norm, []
        self.gradient_state = SimpleNamespace(_set_sync_gradients=lambda v: None)

    def clip_grad_norm_(self, params, max_norm):
        return self.norm

    def backward(self, loss):
        self.backward_losses.append(loss)


@pytest.mark.parametrize("norm", [0.5, float("inf"), None])
def test_deepspeed_float_grad_norm_is_checked_not_stepped_twice(norm):
    acc = _FakeDeepSpeedAccelerator(norm)
    opt = SimpleNamespace(step=lambda: pytest.fail("DeepSpeed steps inside backward; step() must not be called"),
                          zero_grad=lambda **k: None)
    stepper = OptimizerStep(acc, opt, None, [], max_grad_norm=1.0)
    stepper.backward(torch.tensor(2.0))
    assert acc.backward_losses[0].item() == 8.0  # the engine divides by the window length again
    grad_norm, applied = stepper.finish(0)
    assert applied == (norm == 0.5) and stepper.steps_taken == int(norm == 0.5)


def _args(tmp_path, *extra):
    return add_common_args(argparse.ArgumentParser()).parse_args(
        ["--output_dir", str(tmp_path), "--report_to", "none", *extra])


def test_accelerator_knows_the_accumulation_count(tmp_path):
    """DeepSpeed takes its micro-step boundary from the accelerator's count: it must be the run's."""
    acc = setup_accelerator_and_logging(_args(tmp_path, "--gradient_accumulation_steps", "4"))
    assert acc.gradient_accumulation_steps == 4


def test_committed_accelerate_configs_load_and_leave_accumulation_to_the_flags():
    from accelerate.commands.config.config_args import ClusterConfig
    configs = sorted((ROOT / "scripts" / "accelerate").glob("*.yaml"))
    assert {p.name for p in configs} >= {"single.yaml", "ddp.yaml", "deepspeed_zero2.yaml", "fsdp.yaml"}
    for p in configs:
        ClusterConfig.from_yaml_file(str(p))
    ds = yaml.safe_load((ROOT / "scripts/accelerate/deepspeed_zero2.yaml").read_text())["deepspeed_config"]
    assert "gradient_accumulation_steps" not in ds and "gradient_clipping" not in ds
    fsdp = yaml.safe_load((ROOT / "scripts/accelerate/fsdp.yaml").read_text())["fsdp_config"]
    assert fsdp["fsdp_version"] == 2


@pytest.mark.parametrize("stage,engine,flags,works", [
    ("Stage2", DistributedType.NO, {}, None),
    ("Stage2", DistributedType.MULTI_GPU, {"train_ve_first_epoch": True}, None),
    ("Stage2", DistributedType.DEEPSPEED, {}, None),
    ("Stage2", DistributedType.FSDP, {}, None),
    ("Stage1", DistributedType.FSDP, {}, None),
    ("Stage2", DistributedType.DEEPSPEED, {"train_ve_first_epoch": True}, "one process (scripts/accelerate/single.yaml), DDP (ddp.yaml)."),
    ("Stage2", DistributedType.FSDP, {"train_ve_first_epoch": True}, "one process (scripts/accelerate/single.yaml), DDP (ddp.yaml)."),
    ("Stage0", DistributedType.FSDP, {}, None),
    ("Stage0", DistributedType.DEEPSPEED, {}, None),
])
def test_engine_refusal_names_the_engines_that_work(stage, engine, flags, works):
    acc = SimpleNamespace(distributed_type=engine)
    args = SimpleNamespace(**flags)
    if works is None:
        check_engine(acc, stage, args)
        return
    with pytest.raises(SystemExit) as e:
        check_engine(acc, stage, args)
    assert str(e.value).startswith(f"error: {stage} cannot run under {engine.value}: ")
    assert str(e.value).endswith(works)


def test_every_stage_checks_its_engine_before_loading_models(monkeypatch, tmp_path):
    """The check sits in setup_accelerator_and_logging, which every stage calls first."""
    seen = []

    def refuse(acc, stage, args):
        seen.append(stage)
        raise SystemExit("refused")
    monkeypatch.setattr(accelerator_setup, "check_engine", refuse)
    from Stage0.train_vision_encoder_stage0 import main as s0
    from Stage1.train_projection_stage1 import main as s1
    from Stage2.train_vqa_stage2 import main as s2
    # The data file and the Stage 1 folder are checked before the engine (they exist or not, on
    # disk), so the data file exists here and Stage 2 starts without a Stage 1 projector.
    data = tmp_path / "x.json"
    data.write_text('[{"image": "x.png", "caption": "x", "problem": "x", "normal_caption": "x"}]')
    common = ["--output_dir", str(tmp_path), "--report_to", "none", "--image_root", str(tmp_path),
              "--train_json", str(data)]
    model = tmp_path / "model"  # a folder (checked before the engine too) whose loading would fail
    model.mkdir()
    for main, argv in ((s0, ["--model_name", model]),
                       (s1, ["--vision_model_name", model, "--llm_name", model]),
                       (s2, ["--vision_model_name", model, "--llm_name", model])):
        argv = [str(a) for a in argv]
        with pytest.raises(SystemExit, match="refused"):
            main(argv + common)
    assert seen == ["Stage0", "Stage1", "Stage2"]
