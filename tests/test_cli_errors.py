"""User errors at every CLI: one `error:` line on standard error naming the path or flag and the
fix, exit status 2, never a traceback; genuine bugs keep theirs.

Each case runs the CLI's file as `__main__` in a process of its own, as a user runs it. Starting
python with torch and transformers costs about 5 s per process on this machine, so the cases are
forked from one process that paid those imports once (`_run_cases`); one test checks that fresh
`python <cli>.py` processes report exactly what the forked runs do."""
import csv
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import cli
from image_loader import read_json_rows
from projectors import build_vlm, save_vlm
from scripts.make_tiny_models import _texts_from_files, build_tiny_gemma3

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
       "WANDB_MODE": "disabled", "CUDA_VISIBLE_DEVICES": ""}  # no GPU: the --device cuda cases hold anywhere

S0_INFER, S0_EVAL = "Stage0/inference_stage0.py", "Stage0/evaluate_stage0.py"
VQA, S2_EVAL = "Stage2/inference_vqa_stage2.py", "Stage2/evaluate.py"
S0_TRAIN, S1_TRAIN, S2_TRAIN = ("Stage0/train_vision_encoder_stage0.py", "Stage1/train_projection_stage1.py",
                                "Stage2/train_vqa_stage2.py")

# The forked runner: imports every CLI's dependencies once, then runs each case's file as
# __main__ in a fork with its own standard error (fd 2, so library output is caught too).
_RUNNER = textwrap.dedent(r"""
    import json, os, runpy, sys, tempfile, time, traceback
    cases, out_path = json.load(open(sys.argv[1])), sys.argv[2]
    sys.path.insert(0, os.getcwd())
    tmp = tempfile.mkdtemp()
    saved = os.dup(2)
    os.dup2(os.open(os.path.join(tmp, "imports"), os.O_WRONLY | os.O_CREAT), 2)
    import Stage0.evaluate_stage0, Stage0.inference_stage0, Stage0.train_vision_encoder_stage0  # noqa
    import Stage1.train_projection_stage1, Stage2.evaluate, Stage2.inference_vqa_stage2, Stage2.train_vqa_stage2  # noqa
    sys.stderr.flush()
    os.dup2(saved, 2)
    preamble = open(os.path.join(tmp, "imports")).read()  # what a fresh process would print first

    def child(case, err):
        os.dup2(os.open(err, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
        sys.argv = [case["script"], *case["argv"]]
        code = 0
        try:
            runpy.run_path(case["script"], run_name="__main__")
        except SystemExit as e:  # what the interpreter does with it
            if isinstance(e.code, int) or e.code is None:
                code = e.code or 0
            else:
                print(e.code, file=sys.stderr)
                code = 1
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)

    results, running, todo = {}, {}, list(cases)
    while todo or running:
        while todo and len(running) < 2:
            case = todo.pop(0)
            err = os.path.join(tmp, case["id"])
            sys.stdout.flush()
            pid = os.fork()
            if pid == 0:
                child(case, err)
            running[pid] = (case, err, time.time())
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            for p, (case, err, t0) in list(running.items()):
                if time.time() - t0 > 120:
                    os.kill(p, 9)
            time.sleep(0.02)
            continue
        case, err, _ = running.pop(pid)
        results[case["id"]] = {"returncode": os.waitstatus_to_exitcode(status),
                               "stderr": preamble + open(err).read()}
    json.dump(results, open(out_path, "w"))
""")


def _run_cases(cases: list[dict], tmp: Path) -> dict:
    spec, out = tmp / "cases.json", tmp / "results.json"
    spec.write_text(json.dumps(cases))
    proc = subprocess.run([sys.executable, "-c", _RUNNER, str(spec), str(out)], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


# ---------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def fx(tmp_path_factory, demo_dir, tiny_siglip):
    """Folders of every kind, images that fail in every way, and data files that select nothing."""
    root = tmp_path_factory.mktemp("cli_errors")
    lm = build_tiny_gemma3(root / "gemma3", _texts_from_files([demo_dir / "stage2_train.json"]), hidden_size=32,
                           num_layers=1, num_heads=2, vocab_size=300)
    torch.manual_seed(0)
    stage1 = save_vlm(*build_vlm(tiny_siglip, lm), root / "stage1" / "final_model")
    stage2 = root / "stage2" / "final_model"  # what Stage2 adds to the export: the LM on its own
    shutil.copytree(stage1, stage2)
    shutil.copytree(lm, stage2 / "language_model")
    (root / "no_model").mkdir()
    good = demo_dir / json.loads((demo_dir / "stage0_test.json").read_text())[0]["image"]
    (root / "notes.png").write_text("not an image")
    data = good.read_bytes()
    (root / "truncated.png").write_bytes(data[: len(data) // 2])
    (root / "scan_folder").mkdir()
    images = {"missing": root / "absent.png", "text": root / "notes.png", "truncated": root / "truncated.png",
              "directory": root / "scan_folder"}
    row = {"caption": "cardiomegaly", "problem": "Is there cardiomegaly?", "normal_caption": "yes"}
    for kind, path in images.items():  # one evaluation file per failure, its bad image on row 1
        (root / f"eval_{kind}.json").write_text(json.dumps([{**row, "image": str(good)}, {**row, "image": str(path)}]))
    (root / "eval_ok.json").write_text(json.dumps([{**row, "image": str(good)}]))
    (root / "empty.json").write_text("[]")
    (root / "header_only.csv").write_text("img_path,impression,split\n")
    with open(root / "no_val.csv", "w", newline="") as f:  # a split column, and only training rows
        w = csv.writer(f)
        w.writerow(["img_path", "impression", "split"])
        w.writerows([demo_dir / r["image"], r["caption"], "train"]
                    for r in json.loads((demo_dir / "stage0_train.json").read_text())[:8])
    (root / "used_run" / "final_model").mkdir(parents=True)  # another run's output folder
    return {"root": root, "demo": demo_dir, "good": good, "stage0": tiny_siglip, "stage1": stage1,
            "stage2": stage2, "lm": lm, **images}


def _cases(fx) -> list[dict]:
    """(id, script, argv, words the error line must hold: the path or flag, and the fix)."""
    r, d = fx["root"], fx["demo"]
    s0i = [S0_INFER, "--model_path", fx["stage0"], "--queries", "cardiomegaly", "normal", "--device", "cpu"]
    s0e = [S0_EVAL, "--model_path", fx["stage0"], "--image_root", d, "--device", "cpu", "--test_json"]
    vqa = [VQA, "--model_path", fx["stage2"], "--question", "Is there cardiomegaly?", "--device", "cpu",
           "--max_new_tokens", "2"]
    s2e_data = [S2_EVAL, "--image_root", d, "--device", "cpu", "--max_new_tokens", "2", "--output_json",
                r / "eval_out" / "x.json"]
    s2e = [*s2e_data, "--model_path", fx["stage2"], "--test_json"]
    train = ["--image_root", d, "--report_to", "none", "--num_workers", "0", "--max_steps", "1"]
    s0t = [S0_TRAIN, "--model_name", fx["stage0"], "--output_dir", r / "s0_run", *train]
    s1t = [S1_TRAIN, "--vision_model_name", fx["stage0"], "--llm_name", fx["lm"], "--output_dir", r / "s1_run", *train]
    s2t = [S2_TRAIN, "--vision_model_name", fx["stage0"], "--llm_name", fx["lm"], "--output_dir", r / "s2_run", *train]
    img_words = {"missing": ["absent.png", "no such file"], "text": ["notes.png", "not a recognised image format"],
                 "truncated": ["truncated.png", "truncated or corrupt"],
                 "directory": ["scan_folder", "a directory, not a file"]}
    wrong_s0 = ["--model_path", "this is a Stage2 export", "Stage2/inference_vqa_stage2.py", "Stage0 output folder"]
    wrong_s2 = ["--model_path", "this is a Stage0 model", "Stage0/inference_stage0.py", "Stage2 output folder"]
    cases = []

    def case(id, cmd, words, mid_run=False):
        cases.append({"id": id, "script": cmd[0], "argv": [str(a) for a in cmd[1:]], "words": words,
                      "mid_run": mid_run})

    for kind, words in img_words.items():
        case(f"s0-infer-image-{kind}", [*s0i, "--image_path", fx[kind]], words)
        case(f"vqa-image-{kind}", [*vqa, "--image_path", fx[kind]], words)
        # Rows' images are checked for existence before a model loads; decoding happens in the
        # evaluation loop, after the model loaded and printed its progress.
        mid = kind in ("text", "truncated")
        case(f"s0-eval-image-{kind}", [*s0e, r / f"eval_{kind}.json"], words + ["row 1"], mid_run=mid)
        case(f"s2-eval-image-{kind}", [*s2e, r / f"eval_{kind}.json"], words + ["row 1"], mid_run=mid)
    ok = r / "eval_ok.json"
    case("s0-infer-stage2-folder", [*s0i, "--image_path", fx["good"], "--model_path", fx["stage2"]], wrong_s0)
    case("s0-eval-stage2-folder", [*s0e, ok, "--model_path", fx["stage2"]], wrong_s0)
    case("s0-infer-no-model", [*s0i, "--image_path", fx["good"], "--model_path", r / "no_model"],
         ["--model_path", "no model in this folder", "Stage0 output folder"])
    case("s0-eval-no-model", [*s0e, ok, "--model_path", r / "no_model"], ["--model_path", "no model in this folder"])
    case("s0-infer-cuda", [*s0i, "--image_path", fx["good"], "--device", "cuda"], ["--device cuda", "--device cpu"])
    case("s0-eval-cuda", [*s0e, ok, "--device", "cuda"], ["--device cuda", "--device cpu"])
    case("vqa-empty-question", [*vqa, "--image_path", fx["good"], "--question", ""], ["--question", "is empty"])
    case("vqa-blank-question", [*vqa, "--image_path", fx["good"], "--question", "  \t "], ["--question", "is empty"])
    case("vqa-stage0-model-path", [*vqa, "--image_path", fx["good"], "--model_path", fx["stage0"]], wrong_s2)
    case("vqa-stage0-projector-path", [VQA, "--llm_path", fx["stage2"] / "language_model", "--projector_path",
                                       fx["stage0"], "--question", "q", "--device", "cpu", "--image_path", fx["good"]],
         ["--projector_path", "this is a Stage0 model", "projection_layer/"])
    case("vqa-no-model", [*vqa, "--image_path", fx["good"], "--model_path", r / "no_model"],
         ["--model_path", "no model in this folder", "Stage2 output folder"])
    case("vqa-cuda", [*vqa, "--image_path", fx["good"], "--device", "cuda"], ["--device cuda", "--device cpu"])
    case("s2-eval-stage0-model-path", [*s2e, ok, "--model_path", fx["stage0"]], wrong_s2)
    case("s2-eval-stage0-projector-path", [*s2e_data, "--test_json", ok, "--llm_path", fx["stage2"] / "language_model",
                                           "--projector_path", fx["stage0"]],
         ["--projector_path", "this is a Stage0 model", "projection_layer/"])
    case("s2-eval-no-model", [*s2e, ok, "--model_path", r / "no_model"], ["--model_path", "no model in this folder"])
    case("s2-eval-cuda", [*s2e, ok, "--device", "cuda"], ["--device cuda", "--device cpu"])

    for name, cmd, data_flag in (("s0", s0t, "--train_json"), ("s1", s1t, "--train_json"),
                                 ("s2", s2t, "--train_json")):
        valid = d / ("stage2_train.json" if name == "s2" else "stage0_train.json")
        case(f"{name}-train-missing-train", [*cmd, data_flag, r / "absent.json"],
             [data_flag, "absent.json", "no such file"])
        case(f"{name}-train-empty-json", [*cmd, data_flag, r / "empty.json"], [data_flag, "empty.json", "no rows"])
        case(f"{name}-train-missing-val", [*cmd, data_flag, valid, "--val_json", r / "absent_val.json"],
             ["--val_json", "absent_val.json", "no such file"])
        case(f"{name}-train-used-output-dir", [*cmd, data_flag, valid, "--output_dir", r / "used_run"],
             ["used_run", "--overwrite_output_dir"])
    case("s0-train-header-only-csv", [*s0t, "--csv_file", r / "header_only.csv"],
         ["--csv_file", "header_only.csv", "no rows"])
    case("s0-train-split-selects-nothing", [*s0t, "--csv_file", r / "no_val.csv", "--train_split", "training"],
         ["no_val.csv", "split == 'training'", "--train_split"])
    case("s0-train-no-val-rows", [*s0t, "--csv_file", r / "no_val.csv"],
         ["no_val.csv", "split == 'val'", "--val_split"])
    case("s2-train-stage0-as-stage1-projector", [*s2t, "--train_json", d / "stage2_train.json",
                                                 "--stage1_projector_path", fx["stage0"]],
         ["--stage1_projector_path", "this is a Stage0 model", "runs/stage1/final_model"])
    return cases


@pytest.fixture(scope="module")
def results(fx, tmp_path_factory):
    cases = _cases(fx)
    out = _run_cases(cases, tmp_path_factory.mktemp("cli_runs"))
    return {c["id"]: {**c, **out[c["id"]]} for c in cases}


# Case ids without the fixtures (pytest collects before they exist); test_every_case_is_listed
# keeps this list and _cases in step.
CASE_IDS = [f"{cli_}-image-{k}" for k in ("missing", "text", "truncated", "directory")
            for cli_ in ("s0-infer", "vqa", "s0-eval", "s2-eval")] + [
    "s0-infer-stage2-folder", "s0-eval-stage2-folder", "s0-infer-no-model", "s0-eval-no-model", "s0-infer-cuda",
    "s0-eval-cuda", "vqa-empty-question", "vqa-blank-question", "vqa-stage0-model-path",
    "vqa-stage0-projector-path", "vqa-no-model", "vqa-cuda", "s2-eval-stage0-model-path",
    "s2-eval-stage0-projector-path", "s2-eval-no-model", "s2-eval-cuda"] + [
    f"{s}-train-{k}" for s in ("s0", "s1", "s2") for k in ("missing-train", "empty-json", "missing-val",
                                                           "used-output-dir")] + [
    "s0-train-header-only-csv", "s0-train-split-selects-nothing", "s0-train-no-val-rows",
    "s2-train-stage0-as-stage1-projector"]


def test_every_case_is_listed(results):
    assert sorted(results) == sorted(CASE_IDS)


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_user_error_is_one_line_naming_the_input_and_the_fix(results, case_id):
    r = results[case_id]
    err = r["stderr"]
    assert r["returncode"] != 0, err[-2000:]
    assert "Traceback" not in err, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], err[-3000:]
    if not r["mid_run"]:  # refused before any model loaded: nothing else was printed
        assert lines == errors, err[-3000:]
    for word in r["words"]:
        assert word in errors[0], (word, errors[0])


def test_forked_runs_match_fresh_processes(results):
    """The runner above is faithful: a fresh interpreter prints exactly the same."""
    ids = ["vqa-stage0-model-path", "s1-train-missing-train"]
    procs = {i: subprocess.Popen([sys.executable, results[i]["script"], *results[i]["argv"]], cwd=ROOT, env=ENV,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for i in ids}
    for i, p in procs.items():
        _, err = p.communicate(timeout=300)
        assert (p.returncode, err) == (results[i]["returncode"], results[i]["stderr"])


# ---------------------------------------------------------------- cli.py itself

def test_bugs_keep_their_traceback_and_user_errors_become_one_line(tmp_path, capsys, monkeypatch):
    def library_value_error(argv):  # a ValueError raised inside torch is a bug, not the user's
        return torch.nn.functional.cross_entropy(torch.zeros(2, 3), torch.zeros(3, dtype=torch.long))

    def crash(argv):
        return {}["missing key"]
    with pytest.raises(ValueError, match="batch_size"):
        cli.run(library_value_error)
    with pytest.raises(KeyError):
        cli.run(crash)
    bad = tmp_path / "bad.json"
    bad.write_text('{"not": "a list"}')
    with pytest.raises(SystemExit) as e:
        cli.run(lambda argv: read_json_rows(bad, tmp_path, ("image",)))  # the project's own ValueError
    assert e.value.code == 2
    assert capsys.readouterr().err == f"error: {bad}: expected a non-empty JSON list of objects with keys ['image']\n"
    monkeypatch.setenv(cli.TRACEBACK_ENV, "1")
    with pytest.raises(ValueError, match="non-empty JSON list"):
        cli.run(lambda argv: read_json_rows(bad, tmp_path, ("image",)))


def test_worker_tracebacks_become_their_last_line_and_lists_stay_lists():
    msg = ("Caught ImageLoadError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
           '  File "x.py", line 1, in f\nimage_loader.ImageLoadError: Cannot load image \'a.png\' (row 3 of t.json): '
           "no such file. Check the path.\n")
    assert cli.error_text(msg) == "error: Cannot load image 'a.png' (row 3 of t.json): no such file. Check the path."
    assert cli.error_text("2 bad rows:\nt.json row 1: no such file\n  t.json row 4: empty caption\nFix them.") == \
        "error: 2 bad rows:\n  t.json row 1: no such file\n  t.json row 4: empty caption\n  Fix them."
    assert cli.one_line("a projector that does not fit:\n  - in_dim") == \
        "error: a projector that does not fit: - in_dim"


def test_checkpoint_kind_tells_every_folder_apart(fx, tmp_path):
    stage2 = fx["stage2"]
    (tmp_path / "file.bin").write_bytes(b"x")
    kinds = {fx["stage0"]: "stage0", fx["stage1"]: "stage1", stage2: "stage2", stage2 / "projection_layer": "projector",
             stage2 / "language_model": "lm", fx["root"] / "no_model": "unknown", tmp_path / "file.bin": "unknown",
             tmp_path / "nothing": "missing"}
    assert {p: cli.checkpoint_kind(p) for p in kinds} == kinds

