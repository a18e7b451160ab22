"""Preemption as clusters deliver it: SIGTERM to the whole process group while DataLoader
workers run (the trainers' and launchers' default). The workers used to die of the signal
first, torch's child-death handler raised `DataLoader worker ... killed by signal` in the
trainer mid-step, and the run exited 1 with no checkpoint. Each run here must stop with a
checkpoint, exit 0, and resume to the weights of a run never stopped."""
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from test_reliability_loop import (
    ENV,
    ROOT,
    _exit_statuses,
    _launch,
    _same_safetensors,
    _stage0_argv,
    _wait_for_step,
    tiny_vlm_parts,
)

from training.checkpoints import list_checkpoints
from training.data import ignore_stop_signals

STAGE0 = str(ROOT / "Stage0" / "train_vision_encoder_stage0.py")
STAGE2 = str(ROOT / "Stage2" / "train_vqa_stage2.py")
ONE_PROCESS_ENV = {k: v for k, v in ENV.items() if k != "ACCELERATE_USE_CPU"}


def _start(script, argv, log_path):
    log = open(log_path, "w")
    return subprocess.Popen([sys.executable, script, *map(str, argv)], cwd=ROOT, env=ONE_PROCESS_ENV, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)


def _workers_alive(pid) -> int:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return len(out.split())


def _stop_group_and_check(proc, out, log_path, after_step):
    _wait_for_step(proc, out, log_path, after_step)
    assert _workers_alive(proc.pid) >= 2, "the DataLoader workers this test is about are not running"
    os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=180) == 0, log_path.read_text()[-3000:]
    text = log_path.read_text()
    assert "killed by signal" not in text and "Traceback" not in text, text[-3000:]
    step = int(list_checkpoints(out)[-1].name[5:])
    assert f"SIGTERM received: stopped after step {step} " in text
    assert not (out / "final_model").exists()
    return step


def test_a_run_with_workers_exits_without_torch_warnings():
    """The exit hook that stops the workers looked through every live object with isinstance,
    which made torch's deprecated `reduce_op` alias print a FutureWarning at the end of every
    run with DataLoader workers."""
    code = ("import torch.distributed\nfrom torch.utils.data import DataLoader\n"
            "from training.data import loader_kwargs\n"
            "print(sum(len(b) for b in DataLoader(list(range(8)), batch_size=2, **loader_kwargs(2))))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=ONE_PROCESS_ENV, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "8", out.stderr[-2000:]
    assert "Warning" not in out.stderr, out.stderr[-2000:]


def test_workers_leave_stop_signals_to_the_trainer():
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
    try:
        ignore_stop_signals(0)
        assert all(signal.getsignal(s) is signal.SIG_IGN for s in before)
    finally:
        for s, h in before.items():
            signal.signal(s, h)


@pytest.mark.slow
def test_process_group_sigterm_with_workers_one_process_stage0(tiny_siglip, demo_dir, tmp_path):
    flags = dict(max_steps=30, seed=3, num_workers=2, lora_r=4)
    run, ref = tmp_path / "run", tmp_path / "ref"
    proc = _start(STAGE0, _stage0_argv(tiny_siglip, demo_dir, run, **flags), tmp_path / "run.log")
    _stop_group_and_check(proc, run, tmp_path / "run.log", 3)
    proc = _start(STAGE0, _stage0_argv(tiny_siglip, demo_dir, run, resume_from_checkpoint="latest", **flags),
                  tmp_path / "resume.log")
    assert proc.wait(timeout=300) == 0, (tmp_path / "resume.log").read_text()[-3000:]
    proc = _start(STAGE0, _stage0_argv(tiny_siglip, demo_dir, ref, **flags), tmp_path / "ref.log")
    assert proc.wait(timeout=300) == 0, (tmp_path / "ref.log").read_text()[-3000:]
    _same_safetensors(run / "final_model" / "model.safetensors", ref / "final_model" / "model.safetensors")


@pytest.mark.slow
def test_process_group_sigterm_with_workers_two_processes_stage0(tiny_siglip, demo_dir, tmp_path):
    """The DDP config's torchrun agent relays the signal too, so each trainer gets it twice;
    both stop after the same step and exit 0."""
    flags = dict(max_steps=30, seed=3, num_workers=2)
    run = tmp_path / "run"
    proc, log = _launch(tmp_path, _stage0_argv(tiny_siglip, demo_dir, run, **flags), "group")
    _wait_for_step(proc, run, log, 3)
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=180)
    text = log.read_text()
    assert _exit_statuses(tmp_path) == [0, 0], text[-3000:]
    assert "killed by signal" not in text
    step = int(list_checkpoints(run)[-1].name[5:])
    assert f"SIGTERM received: stopped after step {step} " in text and 3 <= step < 30


@pytest.fixture(scope="module")
def vlm(tmp_path_factory, demo_dir):
    return tiny_vlm_parts(tmp_path_factory.mktemp("vlm_workers"), demo_dir, 32)


@pytest.mark.slow
def test_process_group_sigterm_with_workers_one_process_stage2(vlm, demo_dir, tmp_path):
    def argv(out, *extra):
        return ["--image_root", demo_dir, "--train_json", vlm["root"] / "train.json", "--output_dir", out,
                "--vision_model_name", vlm["siglip"], "--llm_name", vlm["gemma3"], "--batch_size", "2",
                "--learning_rate", "2e-3", "--max_steps", "24", "--num_workers", "2", "--report_to", "none",
                "--max_a_len", "12", "--warmup_steps", "1", "--logging_steps", "1", "--no-save_every_epoch",
                "--lora_r", "4", *extra]
    run, ref = tmp_path / "run", tmp_path / "ref"
    proc = _start(STAGE2, argv(run), tmp_path / "run.log")
    _stop_group_and_check(proc, run, tmp_path / "run.log", 3)
    proc = _start(STAGE2, argv(run, "--resume_from_checkpoint", "latest"), tmp_path / "resume.log")
    assert proc.wait(timeout=300) == 0, (tmp_path / "resume.log").read_text()[-3000:]
    proc = _start(STAGE2, argv(ref), tmp_path / "ref.log")
    assert proc.wait(timeout=300) == 0, (tmp_path / "ref.log").read_text()[-3000:]
    for f in ("model.safetensors", "lora_adapter/adapter_model.safetensors"):
        _same_safetensors(run / "final_model" / f, ref / "final_model" / f)


# ---------------------------------------------------------------- through the project's launchers

# Loaded by every Python process of a launch: delays the trainer's stop-signal handler by 8 s,
# longer than `accelerate launch` waits (5 s) before it SIGKILLs a trainer that got a signal.
SLOW_STOP = '''
import signal, time
_signal = signal.signal
def _slow(sig, handler):
    if callable(handler) and getattr(handler, "__module__", "") == "accelerator_setup" and sig == signal.SIGTERM:
        def slow(s, frame, _h=handler):
            time.sleep(8)
            _h(s, frame)
        return _signal(sig, slow)
    return _signal(sig, handler)
signal.signal = _slow
'''


def _descendants(pid) -> list[int]:
    out = subprocess.run(["ps", "-e", "-o", "pid=,ppid="], capture_output=True, text=True).stdout
    children: dict[int, list[int]] = {}
    for line in out.splitlines():
        p, pp = map(int, line.split())
        children.setdefault(pp, []).append(p)
    found, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            found.append(c)
            todo.append(c)
    return found


def _run_launcher(tmp_path, launcher, name, env_extra, *argv):
    (tmp_path / "site").mkdir(exist_ok=True)
    (tmp_path / "site" / "sitecustomize.py").write_text(SLOW_STOP)
    env = {**ENV, "PYTHONPATH": f"{tmp_path / 'site'}:{ROOT}", "PATH": f"{Path(sys.executable).parent}:"
           f"{os.environ['PATH']}", **env_extra}
    log = open(tmp_path / f"{name}.log", "w")
    return subprocess.Popen(["bash", launcher, *map(str, argv)], cwd=ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True), tmp_path / f"{name}.log"


def _stage0_launch(tiny_siglip, demo_dir, num_gpus):
    flags = ["--max_steps", "30", "--seed", "3", "--num_workers", "2", "--warmup_steps", "2", "--logging_steps", "1",
             "--no-save_epoch_models"]

    def env(out):
        return {"MODEL_NAME": str(tiny_siglip), "TRAIN_JSON": str(demo_dir / "stage0_train.json"),
                "VAL_JSON": str(demo_dir / "stage0_val.json"), "IMAGE_ROOT": str(demo_dir), "BATCH_SIZE": "8",
                "LEARNING_RATE": "1e-3", "MIXED_PRECISION": "no", "OUTPUT_DIR": str(out), "REPORT_TO": "none",
                "NUM_GPUS": str(num_gpus)}
    return "Stage0/run_train_vision_encoder_stage0.sh", env, flags, ["model.safetensors"]


def _stage2_launch(vlm_stage1, demo_dir, num_gpus):
    flags = ["--max_steps", "24", "--seed", "3", "--warmup_steps", "1", "--logging_steps", "1", "--no-save_every_epoch"]

    def env(out):  # VAL_JSON empty: no validation
        return {"IMAGE_ROOT": str(demo_dir), "TRAIN_JSON": str(vlm_stage1["root"] / "train.json"), "VAL_JSON": "",
                "STAGE1_PROJECTOR_PATH": str(vlm_stage1["stage1"]), "VISION_MODEL_NAME": str(vlm_stage1["siglip"]),
                "LLM_NAME": str(vlm_stage1["gemma3"]), "BATCH_SIZE": "2", "GRAD_ACCUM": "1", "LEARNING_RATE": "2e-3",
                "MAX_A_LEN": "12", "LORA_R": "4", "MIXED_PRECISION": "no", "NUM_WORKERS": "2",
                "OUTPUT_DIR": str(out), "REPORT_TO": "none", "NUM_GPUS": str(num_gpus)}
    return "scripts/run_stage2.sh", env, flags, ["model.safetensors", "lora_adapter/adapter_model.safetensors"]


@pytest.fixture(scope="module")
def vlm_stage1(vlm):
    """The tiny towers and a Stage 1 folder, as the Stage 2 launcher starts from one."""
    import torch

    from vlm import build_vlm, save_vlm
    torch.manual_seed(1)
    return {**vlm, "stage1": save_vlm(*build_vlm(vlm["siglip"], vlm["gemma3"]), vlm["root"] / "stage1" / "final_model")}


@pytest.mark.slow
@pytest.mark.parametrize("num_gpus", [1, 2])
@pytest.mark.parametrize("stage", ["stage0", "stage2"])
def test_process_group_sigterm_through_the_launcher_stops_with_a_checkpoint_and_resumes_exactly(
        request, demo_dir, tmp_path, stage, num_gpus):
    """SLURM's SIGTERM to the launcher's process group, with 2 DataLoader workers per trainer
    and a trainer that needs 8 s to stop: `accelerate launch` used to SIGKILL it after 5 s (one
    process) and torch's launcher to exit 143 (several). The launcher relays the signal to the
    trainers alone; they checkpoint, and the launcher exits 0. Rerun through the launcher (it
    passes --resume_from_checkpoint latest), the run ends with the weights of a run never
    stopped."""
    if stage == "stage0":
        launcher, env, flags, files = _stage0_launch(request.getfixturevalue("tiny_siglip"), demo_dir, num_gpus)
    else:
        launcher, env, flags, files = _stage2_launch(request.getfixturevalue("vlm_stage1"), demo_dir, num_gpus)
    run, ref = tmp_path / "run", tmp_path / "ref"
    proc, log = _run_launcher(tmp_path, launcher, "run", env(run), *flags)
    _wait_for_step(proc, run, log, 3)
    assert len(_descendants(proc.pid)) >= num_gpus * 3, "the DataLoader workers this test is about are not running"
    os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=240) == 0, log.read_text()[-3000:]
    text = log.read_text()
    assert "killed by signal" not in text and "Traceback" not in text, text[-3000:]
    step = int(list_checkpoints(run)[-1].name[5:])
    last = int(flags[flags.index("--max_steps") + 1])
    assert 3 <= step < last and f"SIGTERM received: stopped after step {step} " in text
    assert not (run / "final_model").exists()
    proc, log = _run_launcher(tmp_path, launcher, "resume", env(run), *flags)
    assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]
    assert f"resumed from {run / 'checkpoints' / f'step_{step}'} (step {step})" in log.read_text()
    proc, log = _run_launcher(tmp_path, launcher, "ref", env(ref), *flags)
    assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]
    for f in files:
        _same_safetensors(run / "final_model" / f, ref / "final_model" / f)


def test_a_launcher_finds_the_project_venv_or_says_how_to_get_one(tmp_path):
    path = "/usr/bin:/bin"  # no accelerate on it
    out = subprocess.run(["bash", "-c", "source scripts/launch_env.sh && command -v accelerate"], cwd=ROOT,
                         env={"PATH": path, "HOME": os.environ.get("HOME", "/tmp")}, capture_output=True, text=True)
    if (ROOT / ".venv" / "bin" / "accelerate").exists():
        assert out.returncode == 0 and out.stdout.strip() == str(ROOT / ".venv" / "bin" / "accelerate")
    fake_root = tmp_path / "repo"
    (fake_root / "scripts").mkdir(parents=True)
    (fake_root / "scripts" / "launch_env.sh").write_text((ROOT / "scripts" / "launch_env.sh").read_text())
    out = subprocess.run(["bash", "-c", "source scripts/launch_env.sh && echo unreachable"], cwd=fake_root,
                         env={"PATH": path}, capture_output=True, text=True)
    assert out.returncode == 1 and "unreachable" not in out.stdout
    assert "bash scripts/quickstart.sh" in out.stderr and "source .venv/bin/activate" in out.stderr
