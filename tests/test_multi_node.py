"""Past one machine: the launchers' multi-node flags, two launcher invocations on this machine
as two "machines" (one CPU process each) training exactly what one machine with two processes
trains, and a machine that cannot see the shared output folder stopping the whole job."""
import socket

import pytest
from conftest import launcher_argv, run_launcher
from test_preemption_workers import _run_launcher, _stage0_launch, _stage2_launch, vlm, vlm_stage1  # noqa: F401
from test_reliability_loop import _free_port, _same_safetensors

LAUNCHERS = ["Stage0/run_train_vision_encoder_stage0.sh", "scripts/run_stage1.sh", "scripts/run_stage2.sh",
             "scripts/run_knee_raddino.sh", "scripts/run_ct_clip.sh", "scripts/run_derm_lora.sh"]


def _accelerate_flags(script, tmp_path, **env) -> list[str]:
    """`accelerate launch`'s own arguments as the launcher passes them (before the trainer), or
    ["exit", status, stderr] when the launcher refuses."""
    proc = run_launcher(script, tmp_path, **env)
    if proc.returncode:
        return ["exit", str(proc.returncode), proc.stderr.strip()]
    return launcher_argv(proc)[0]


def _flag(argv, name):
    return argv[argv.index(name) + 1] if name in argv else None


@pytest.mark.parametrize("script", LAUNCHERS)
def test_every_launcher_takes_the_machine_layout(script, tmp_path):
    one = _accelerate_flags(script, tmp_path)
    assert _flag(one, "--num_processes") == "1" and _flag(one, "--config_file") == "scripts/accelerate/single.yaml"
    assert "--num_machines" not in one and "--main_process_ip" not in one  # one machine: nothing else
    two = _accelerate_flags(script, tmp_path, NUM_MACHINES="2", MACHINE_RANK="1", MAIN_PROCESS_IP="10.1.2.3",
                            MAIN_PROCESS_PORT="29555", NUM_GPUS="1")
    # one GPU on each of two machines is a 2-process DDP job, not the single-process config
    assert _flag(two, "--config_file") == "scripts/accelerate/ddp.yaml" and _flag(two, "--num_processes") == "2"
    assert [_flag(two, f) for f in ("--num_machines", "--machine_rank", "--main_process_ip", "--main_process_port")] \
        == ["2", "1", "10.1.2.3", "29555"]
    assert "--rdzv_backend" not in two
    many = _accelerate_flags(script, tmp_path, NUM_MACHINES="4", MACHINE_RANK="0", MAIN_PROCESS_IP="head",
                             NUM_GPUS="8", RDZV_BACKEND="c10d")
    assert _flag(many, "--num_processes") == "32" and _flag(many, "--rdzv_backend") == "c10d"
    assert _flag(many, "--main_process_port") == "29500"


def test_a_bad_machine_layout_is_refused_in_one_line(tmp_path):
    script = "scripts/run_stage1.sh"
    for env, words in [({"NUM_MACHINES": "2"}, "needs MAIN_PROCESS_IP"),
                       ({"NUM_MACHINES": "2", "MACHINE_RANK": "2", "MAIN_PROCESS_IP": "h"}, "MACHINE_RANK < NUM_MACHINES"),
                       ({"NUM_GPUS": "two"}, "NUM_GPUS=two: expected a whole number")]:
        result = _accelerate_flags(script, tmp_path, **env)
        assert result[:2] == ["exit", "2"] and words in result[2] and len(result[2].splitlines()) == 1, result


def _two_machines(tmp_path, launcher, env, flags, out0, out1, name):
    """The launcher started twice on this machine as machines 0 and 1 (one process each)."""
    port = str(_free_port())
    machines = []
    for rank, out in ((0, out0), (1, out1)):
        extra = {**env(out), "NUM_GPUS": "1", "NUM_MACHINES": "2", "MACHINE_RANK": str(rank),
                 "MAIN_PROCESS_IP": "127.0.0.1", "MAIN_PROCESS_PORT": port}
        machines.append(_run_launcher(tmp_path, launcher, f"{name}{rank}", extra, *flags))
    return [(proc.wait(timeout=600), log.read_text()) for proc, log in machines]


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["stage0", "stage2"])
def test_two_machines_train_what_one_machine_with_two_processes_trains(request, demo_dir, tmp_path, stage):
    if stage == "stage0":
        launcher, env, flags, files = _stage0_launch(request.getfixturevalue("tiny_siglip"), demo_dir, 2)
    else:
        launcher, env, flags, files = _stage2_launch(request.getfixturevalue("vlm_stage1"), demo_dir, 2)
    flags = list(flags)
    flags[flags.index("--max_steps") + 1] = "8"
    nodes, one = tmp_path / "two_machines", tmp_path / "one_machine"
    for status, text in _two_machines(tmp_path, launcher, env, flags, nodes, nodes, "machine"):
        assert status == 0, text[-3000:]
    proc, log = _run_launcher(tmp_path, launcher, "one", env(one), *flags)  # NUM_GPUS=2 on one machine
    assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]
    import json
    assert json.loads((nodes / "args.json").read_text())["num_processes"] == 2
    for f in files:
        _same_safetensors(nodes / "final_model" / f, one / "final_model" / f)


@pytest.mark.slow
def test_a_machine_that_cannot_see_the_output_folder_stops_the_job(demo_dir, tiny_siglip, tmp_path):
    """Machine 1's OUTPUT_DIR is another folder, as a node-local disk would be: the job stops on
    both machines before the first step, naming the host and the folder."""
    launcher, env, flags, _ = _stage0_launch(tiny_siglip, demo_dir, 2)
    shared, local = tmp_path / "shared", tmp_path / "node_local"
    results = _two_machines(tmp_path, launcher, env, flags, shared, local, "blind")
    host = socket.gethostname()
    for status, text in results:
        assert status != 0, text[-3000:]
    text = results[0][1]
    assert f"process 1 on {host} ({local})" in text and "cannot see the file the main process" in text, text[-3000:]
    assert "node-local disk" in text
    assert not (shared / "checkpoints").exists() and not list(shared.glob(".shared_folder_check_*"))


RESUME_VIEWS = '''
import sys
import torch
from accelerate import Accelerator
from training import checkpoints
acc = Accelerator(cpu=True)
model, opt = acc.prepare(torch.nn.Linear(2, 2), torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1))
lagging, damaged = sys.argv[1], sys.argv[2]
for out in (lagging, damaged):
    for step in (3, 5):
        checkpoints.save_checkpoint(acc, out, step, {"epoch": 0})
real_list, real_load = checkpoints.list_checkpoints, checkpoints.load_checkpoint
if acc.process_index == 1:  # this machine's view of the folder lags one checkpoint behind
    checkpoints.list_checkpoints = lambda d: real_list(d)[:-1] if str(d) == lagging else real_list(d)
state = checkpoints.resume_from(acc, lagging, "latest")
print(f"lagging: rank {acc.process_index} resumed step {state['step']}", flush=True)
checkpoints.list_checkpoints = real_list

def load(accelerator, path):  # step 5's files are unreadable on machine 1 alone
    if acc.process_index == 1 and path.name == "step_5":
        raise OSError("Input/output error")
    return real_load(accelerator, path)
checkpoints.load_checkpoint = load
state = checkpoints.resume_from(acc, damaged, "latest")
print(f"damaged: rank {acc.process_index} resumed step {state['step']}", flush=True)
'''


@pytest.mark.slow
def test_every_process_resumes_the_checkpoint_the_main_process_chose(tmp_path):
    """`latest` is the main process's newest checkpoint on every process, and a checkpoint one
    process cannot load is passed over by all of them: otherwise processes resume different
    steps (different weights and data positions) and the job diverges or hangs."""
    from conftest import accelerate_two_processes
    script = tmp_path / "resume_views.py"
    script.write_text(RESUME_VIEWS)
    proc = accelerate_two_processes(str(script), [tmp_path / "lagging", tmp_path / "damaged"], timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]
    for rank in (0, 1):
        assert f"lagging: rank {rank} resumed step 5" in proc.stdout, proc.stdout[-3000:]
        assert f"damaged: rank {rank} resumed step 3" in proc.stdout, proc.stdout[-3000:]
    assert "step_5 is damaged (OSError: Input/output error)" in proc.stdout
