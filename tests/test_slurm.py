"""scripts/slurm/train.sbatch with stand-ins for srun, scontrol and scancel: the environment it
hands each node's launcher, and a requeue cycle (time limit near -> checkpoint -> requeue ->
the requeued job resumes to the weights of a run never stopped)."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT
from test_preemption_workers import SLOW_STOP, _stage0_launch
from test_reliability_loop import ENV, _same_safetensors, _wait_for_step

SBATCH = ROOT / "scripts" / "slurm" / "train.sbatch"

# srun: one task per node of the allocation, SLURM_NODEID set, the task pids recorded for scancel.
SRUN = r'''#!/usr/bin/env bash
while [ "${1#--}" != "$1" ]; do shift; done
: > "$STUB_DIR/steps.pids"
pids=()
for ((i = 0; i < SLURM_JOB_NUM_NODES; i++)); do
    SLURM_NODEID=$i SLURM_PROCID=$i "$@" &
    pids+=($!); echo $! >> "$STUB_DIR/steps.pids"
done
status=0
for p in "${pids[@]}"; do wait "$p" || status=$?; done
exit $status
'''
SCONTROL = r'''#!/usr/bin/env bash
case "$1 $2" in
    "show hostnames") for ((i = 7; i < 7 + SLURM_JOB_NUM_NODES; i++)); do printf 'gpu%02d\n' $i; done ;;
    "requeue "*) echo "$2" >> "$STUB_DIR/requeued.log" ;;
esac
'''
SCANCEL = r'''#!/usr/bin/env bash
sig=${1#--signal=}
echo "$*" >> "$STUB_DIR/scancel.log"
while read -r pid; do kill -"$sig" "$pid" 2>/dev/null; done < "$STUB_DIR/steps.pids"
'''
# One write per line: the nodes' stand-ins share one pipe, and print() writes the text and its
# newline apart, so two nodes' lines could run together.
ACCELERATE = ('#!/usr/bin/env python3\nimport json, os, sys\n'
              'os.write(1, (json.dumps(sys.argv[1:]) + "\\n").encode())\n')


def _stubs(tmp_path, fake_accelerate=False) -> dict:
    stub = tmp_path / "slurm_bin"
    stub.mkdir(exist_ok=True)
    tools = {"srun": SRUN, "scontrol": SCONTROL, "scancel": SCANCEL, **({"accelerate": ACCELERATE}
                                                                         if fake_accelerate else {})}
    for name, text in tools.items():
        (stub / name).write_text(text)
        (stub / name).chmod(0o755)
    return {"STUB_DIR": str(stub), "PATH": f"{stub}:{Path(sys.executable).parent}:{os.environ['PATH']}"}


def _slurm_env(nodes, job_id="4321", **extra) -> dict:
    return {"SLURM_JOB_ID": job_id, "SLURM_JOB_NUM_NODES": str(nodes), "SLURM_JOB_NODELIST": f"gpu[07-{6 + nodes:02d}]",
            "SLURM_SUBMIT_DIR": str(ROOT), **extra}


def test_each_node_gets_its_rank_and_the_head_nodes_address(tmp_path):
    env = {**os.environ, **_stubs(tmp_path, fake_accelerate=True),
           **_slurm_env(2, SLURM_GPUS_ON_NODE="4", LAUNCHER="scripts/run_stage1.sh")}
    out = subprocess.run(["bash", str(SBATCH), "--max_steps", "5"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    calls = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("[")]
    assert len(calls) == 2

    def flag(argv, name):
        return argv[argv.index(name) + 1]
    assert sorted(flag(c, "--machine_rank") for c in calls) == ["0", "1"]
    for argv in calls:
        assert flag(argv, "--num_machines") == "2" and flag(argv, "--num_processes") == "8"  # 2 nodes x 4 GPUs
        assert flag(argv, "--main_process_ip") == "gpu07" and flag(argv, "--main_process_port") == "29821"
        assert flag(argv, "--config_file") == "scripts/accelerate/ddp.yaml"
        assert "Stage1/train_projection_stage1.py" in argv and argv[-2:] == ["--max_steps", "5"]
    assert "job 4321 (restart 0): scripts/run_stage1.sh on 2 node(s) x 4 GPU(s), head gpu07:29821" in out.stdout


def test_outside_slurm_or_the_repository_it_says_so(tmp_path):
    env = {**os.environ, **_stubs(tmp_path)}
    out = subprocess.run(["bash", str(SBATCH)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "SLURM_JOB_ID is not set: run this through sbatch" in out.stderr
    out = subprocess.run(["bash", str(SBATCH)], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         env={**env, **_slurm_env(1, SLURM_SUBMIT_DIR=str(tmp_path))})
    assert out.returncode == 2 and "is not the repository root" in out.stderr


@pytest.mark.slow
def test_a_requeue_cycle_resumes_to_the_weights_of_a_run_never_stopped(demo_dir, tiny_siglip, tmp_path):
    launcher, env_of, flags, files = _stage0_launch(tiny_siglip, demo_dir, 1)
    run, ref = tmp_path / "run", tmp_path / "ref"
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(SLOW_STOP)  # a trainer that needs 8 s to stop
    base = {**ENV, **env_of(run), **_stubs(tmp_path), "PYTHONPATH": f"{tmp_path / 'site'}:{ROOT}",
            "LAUNCHER": launcher}
    base.pop("ACCELERATE_USE_CPU")  # one process
    stub = Path(base["STUB_DIR"])

    def job(restart, log_name):
        log = open(tmp_path / log_name, "w")
        proc = subprocess.Popen(["bash", str(SBATCH), *flags], cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
                                env={**base, **_slurm_env(1, SLURM_RESTART_COUNT=str(restart))},
                                start_new_session=True)
        return proc, tmp_path / log_name

    proc, log = job(0, "job0.log")
    _wait_for_step(proc, run, log, 3)
    os.kill(proc.pid, signal.SIGUSR1)  # what --signal=B:USR1@120 does near the time limit
    assert proc.wait(timeout=240) == 0, log.read_text()[-3000:]
    text = log.read_text()
    assert (stub / "scancel.log").read_text().split() == ["--signal=USR1", "4321"]
    assert (stub / "requeued.log").read_text().split() == ["4321"], text[-3000:]
    assert "SIGUSR1 received: stopped after step" in text and not (run / "final_model").exists()

    proc, log = job(1, "job1.log")  # the requeued job: the same script, restart 1
    assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]
    assert "resumed from" in log.read_text() and (stub / "requeued.log").read_text().split() == ["4321"]
    ref_env = {**ENV, **env_of(ref), "PYTHONPATH": str(ROOT), "PATH": base["PATH"]}
    ref_env.pop("ACCELERATE_USE_CPU")
    done = subprocess.run(["bash", launcher, *flags], cwd=ROOT, env=ref_env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    for f in files:
        _same_safetensors(run / "final_model" / f, ref / "final_model" / f)
