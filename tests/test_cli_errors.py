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

import numpy as np
import pytest
import torch

import cli
import preflight
from data_rows import read_json_rows
from scripts.demo.make_tiny_models import _texts_from_files, build_tiny_gemma3
from vlm import build_vlm, save_vlm

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
    (root / "all_missing.json").write_text(json.dumps([{**row, "image": f"absent_{k}.png"} for k in range(25)]))
    (root / "empty.json").write_text("[]")
    (root / "header_only.csv").write_text("img_path,impression,split\n")
    with open(root / "no_val.csv", "w", newline="") as f:  # a split column, and only training rows
        w = csv.writer(f)
        w.writerow(["img_path", "impression", "split"])
        w.writerows([demo_dir / r["image"], r["caption"], "train"]
                    for r in json.loads((demo_dir / "stage0_train.json").read_text())[:8])
    (root / "used_run" / "final_model").mkdir(parents=True)  # another run's output folder
    # Two bad rows after a good one: the data CLIs list both, or leave both out.
    (root / "eval_two_bad.json").write_text(json.dumps([{**row, "image": str(p)} for p in (good, root / "absent.png",
                                                                                         root / "notes.png")]))
    # The user's own files, which no tool may replace without --force.
    (root / "volumes").mkdir()
    for i in range(2):
        np.savez(root / "volumes" / f"vol{i}.npz", image=np.zeros((1, 4, 8, 8), np.float32))
    user_files = {"user.csv": "img_path,findings,split\nvolumes/vol0.npz,a radiologist's report,train\n",
                  "predictions.csv": "image_path,top_match\nx.png,mine\n", "metrics.json": '{"mine": 1}\n',
                  "user_data/stage0_train.json": '[{"image": "mine.png", "caption": "mine"}]'}
    for name, text in user_files.items():
        (root / name).parent.mkdir(exist_ok=True)
        (root / name).write_text(text)
    # Weights cut short, as an interrupted copy or download leaves them.
    cut_weights = {}
    for kind, src in (("stage0", tiny_siglip), ("stage2", stage2)):
        cut_weights[kind] = shutil.copytree(src, root / f"{kind}_cut_weights")
        weights = cut_weights[kind] / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return {"root": root, "demo": demo_dir, "good": good, "stage0": tiny_siglip, "stage1": stage1,
            "stage2": stage2, "lm": lm, "user_files": user_files, "cut_weights": cut_weights, **images}


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

    def case(id, cmd, words, mid_run=False, lines=1):
        """`lines`: the error line and the list under it (bad rows), when there is one."""
        cases.append({"id": id, "script": cmd[0], "argv": [str(a) for a in cmd[1:]], "words": words,
                      "mid_run": mid_run, "lines": lines})

    for kind, words in img_words.items():
        case(f"s0-infer-image-{kind}", [*s0i, "--image_path", fx[kind]], words)
        case(f"vqa-image-{kind}", [*vqa, "--image_path", fx[kind]], words)
        # The rows' images are checked (headers) before a model loads, as training checks them.
        rows = [w.replace("truncated or corrupt", "truncated") for w in words] + ["row 1", "--on_bad_sample skip"]
        case(f"s0-eval-image-{kind}", [*s0e, r / f"eval_{kind}.json"], rows)
        case(f"s2-eval-image-{kind}", [*s2e, r / f"eval_{kind}.json"], rows)
    two_bad = r / "eval_two_bad.json"
    listed = ["2 bad rows", f"{two_bad} row 1: ", f"{two_bad} row 2: ", "--on_bad_sample skip"]
    case("s0-infer-csv-bad-rows", [*s0i, "--csv_path", two_bad, "--output_path", r / "pred_out.csv"], listed, lines=4)
    case("s0-eval-bad-rows", [*s0e, two_bad], listed, lines=4)
    case("s2-eval-bad-rows", [*s2e, two_bad], listed, lines=4)
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
    case("s2-eval-num-beams-0", [*s2e, ok, "--num_beams", "0"], ["--num_beams", ">= 1"])
    cut = ["--model_path", "model.safetensors", "cut short", "copy"]
    case("s0-infer-truncated-weights", [*s0i, "--image_path", fx["good"], "--model_path", fx["cut_weights"]["stage0"]],
         cut)
    case("s0-eval-truncated-weights", [*s0e, ok, "--model_path", fx["cut_weights"]["stage0"]], cut)
    case("vqa-truncated-weights", [*vqa, "--image_path", fx["good"], "--model_path", fx["cut_weights"]["stage2"]], cut)
    case("s2-eval-truncated-weights", [*s2e, ok, "--model_path", fx["cut_weights"]["stage2"]], cut)
    hub_id = "nobody-here/no-such-siglip"  # HF_HUB_OFFLINE=1 and not in the cache
    not_cached = ["--vision_model_name", hub_id, "HF_HUB_OFFLINE", "cache"]
    case("vqa-vision-hub-id-not-cached", [VQA, "--llm_path", fx["stage2"] / "language_model", "--projector_path",
                                          fx["stage2"] / "projection_layer", "--vision_model_name", hub_id,
                                          "--question", "q", "--device", "cpu", "--image_path", fx["good"]],
         not_cached)
    case("s2-eval-vision-hub-id-not-cached", [*s2e_data, "--test_json", ok, "--llm_path",
                                              fx["stage2"] / "language_model", "--projector_path",
                                              fx["stage2"] / "projection_layer", "--vision_model_name", hub_id],
         not_cached)
    # Files of the user's that a tool would write over.
    case("s0-create-example-csv-existing", [S0_TRAIN, "--create_example_csv", "--npz_directory", r / "volumes",
                                            "--csv_file", r / "user.csv"], ["user.csv", "--force"])
    case("s0-infer-output-exists", [*s0i, "--csv_path", ok, "--output_path", r / "predictions.csv"],
         ["--output_path", "predictions.csv", "--force"])
    case("s0-eval-output-exists", [*s0e, ok, "--output_json", r / "metrics.json"],
         ["--output_json", "metrics.json", "--force"])
    case("s2-eval-output-exists", [*s2e, ok, "--output_json", r / "metrics.json"],
         ["--output_json", "metrics.json", "--force"])
    case("demo-data-into-user-folder", ["scripts/demo/make_demo_data.py", "--out_dir", r / "user_data", "--num_images", "4",
                                        "--image_size", "32", "--num_workers", "1"], ["user_data", "--force"])
    case("preprocess-cache-dir-is-a-file", ["scripts/data/preprocess_images.py", "--data", ok, "--size", "8", "8",
                                            "--cache_dir", r / "notes.png"], ["--cache_dir", "notes.png"])

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
    s0_rows = [*s0t, "--train_json", d / "stage0_train.json"]
    for flag, value, bound in (("--batch_size", "0", ">= 1"), ("--gradient_accumulation_steps", "0", ">= 1"),
                               ("--max_steps", "0", ">= 1"), ("--learning_rate", "-1", "> 0")):
        case(f"s0-train{flag[1:].replace('_', '-')}-{value}", [*s0_rows, flag, value], [flag, bound])
    case("s2-train-learning-rate--1", [*s2t, "--train_json", d / "stage2_train.json", "--learning_rate", "-1"],
         ["--learning_rate", "> 0"])
    # Every row bad: one line, not the list, and not the advice to skip them (nothing would be left).
    case("s0-train-every-row-bad", [*s0t, "--train_json", r / "all_missing.json"],
         ["every row of", "all_missing.json", "(train) is bad (25 rows", "absent_0.png", "fix the data file"],
         mid_run=True)
    # Refused before the output folder is written (each case has its own, which must not appear).
    for name, cmd, flag in (("s0", s0t, "--model_name"), ("s1", s1t, "--llm_name"), ("s2", s2t, "--llm_name")):
        valid = d / ("stage2_train.json" if name == "s2" else "stage0_train.json")
        base = [*cmd, "--train_json", valid]
        case(f"{name}-train-model-typo", [*base, flag, r / "no_such_model", "--output_dir", r / f"{name}_typo_run"],
             [flag, "no_such_model", "no such folder"])
        case(f"{name}-train-hub-id-not-cached", [*base, "--vision_model_name" if name != "s0" else flag, hub_id,
                                                 "--output_dir", r / f"{name}_hub_run"],
             ["--vision_model_name" if name != "s0" else flag, hub_id, "HF_HUB_OFFLINE", "cache"])
        case(f"{name}-train-output-dir-is-a-file", [*base, "--output_dir", r / "notes.png"],
             ["--output_dir", "notes.png", "not a folder"])
        case(f"{name}-train-resume-missing", [*base, "--output_dir", r / f"{name}_resume_run",
                                              "--resume_from_checkpoint", r / "no_such_checkpoint"],
             ["--resume_from_checkpoint", "no_such_checkpoint", "latest"])
    return cases


RUN_FOLDERS_NEVER_WRITTEN = [f"{s}_{k}_run" for s in ("s0", "s1", "s2") for k in ("typo", "hub", "resume")]


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
    "s2-train-stage0-as-stage1-projector"] + [
    "s0-infer-csv-bad-rows", "s0-eval-bad-rows", "s2-eval-bad-rows", "s2-eval-num-beams-0"] + [
    f"{cli_}-truncated-weights" for cli_ in ("s0-infer", "s0-eval", "vqa", "s2-eval")] + [
    "vqa-vision-hub-id-not-cached", "s2-eval-vision-hub-id-not-cached", "s0-create-example-csv-existing",
    "s0-infer-output-exists", "s0-eval-output-exists", "s2-eval-output-exists", "demo-data-into-user-folder",
    "preprocess-cache-dir-is-a-file", "s0-train-batch-size-0", "s0-train-gradient-accumulation-steps-0",
    "s0-train-max-steps-0", "s0-train-learning-rate--1", "s2-train-learning-rate--1", "s0-train-every-row-bad"] + [
    f"{s}-train-{k}" for s in ("s0", "s1", "s2") for k in ("model-typo", "hub-id-not-cached",
                                                           "output-dir-is-a-file", "resume-missing")]


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
    assert len(errors) == 1, err[-3000:]
    block = lines[lines.index(errors[0]):]  # the error line, then the list it carries (bad rows)
    assert len(block) == r["lines"] and all(ln.startswith("  ") for ln in block[1:]), err[-3000:]
    if not r["mid_run"]:  # refused before any model loaded: nothing else was printed
        assert lines == block, err[-3000:]
    for word in r["words"]:
        assert word in "\n".join(block), (word, block)


def test_refusals_leave_the_users_files_and_write_no_run_folder(results, fx):
    for name, text in fx["user_files"].items():
        assert (fx["root"] / name).read_text() == text, name
    assert [p.name for p in (fx["root"] / "user_data").iterdir()] == ["stage0_train.json"]
    assert not [name for name in RUN_FOLDERS_NEVER_WRITTEN if (fx["root"] / name).exists()]
    assert not (fx["root"] / "pred_out.csv").exists()


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
    assert {p: preflight.checkpoint_kind(p) for p in kinds} == kinds



# ---------------------------------------------------------------- --on_bad_sample skip at the data CLIs

def test_inference_skip_writes_the_dropped_rows_with_empty_predictions(fx, tmp_path, capsys):
    from Stage0.inference_stage0 import main as infer
    out = tmp_path / "pred.csv"
    infer(["--model_path", str(fx["stage0"]), "--csv_path", str(fx["root"] / "eval_two_bad.json"), "--output_path",
           str(out), "--queries", "cardiomegaly", "normal", "--device", "cpu", "--on_bad_sample", "skip"])
    rows = list(csv.DictReader(open(out)))
    assert [r["image_path"] for r in rows] == [str(fx["good"]), str(fx["missing"]), str(fx["text"])]
    assert rows[0]["top_match"] in ("cardiomegaly", "normal") and 0 < float(rows[0]["top_score"]) < 1
    assert [(r["top_match"], r["top_score"], r["cardiomegaly"], r["normal"]) for r in rows[1:]] == [("",) * 4] * 2
    err = capsys.readouterr().err
    assert "--on_bad_sample skip: 2 bad rows" in err and "row 1: " in err and "row 2: " in err


def test_evaluations_skip_bad_rows_and_say_so(fx, tmp_path, capsys):
    from Stage0.evaluate_stage0 import main as s0_eval
    from Stage2.evaluate import main as s2_eval
    good = [{**r, "problem": "Is there cardiomegaly?", "normal_caption": "no"}
            for r in json.loads((fx["demo"] / "stage0_test.json").read_text())[:5]]
    bad = [{**good[0], "image": str(fx["missing"])}, {**good[0], "image": str(fx["text"])}]
    data = tmp_path / "mixed.json"
    data.write_text(json.dumps(good + bad))
    common = ["--test_json", str(data), "--image_root", str(fx["demo"]), "--device", "cpu", "--on_bad_sample", "skip"]
    results = s0_eval(["--model_path", str(fx["stage0"]), *common, "--output_json", str(tmp_path / "s0.json")])
    (metrics,) = results.values()
    assert metrics["skipped_rows"] == 2
    err = capsys.readouterr().err
    assert "--on_bad_sample skip: 2 bad rows" in err and f"{data} row 5: " in err and f"{data} row 6: " in err
    summary = s2_eval(["--model_path", str(fx["stage2"]), *common, "--max_new_tokens", "2",
                       "--output_json", str(tmp_path / "s2.json")])
    saved = json.loads((tmp_path / "s2.json").read_text())
    assert summary["n"] == 5 and len(saved["predictions"]) == 5
    assert [s["row"] for s in saved["summary"]["skipped"]] == [5, 6]
    assert "--on_bad_sample skip: 2 bad rows" in capsys.readouterr().err


ENTRY_POINTS = ["Stage0/train_vision_encoder_stage0.py", "Stage1/train_projection_stage1.py",
                "Stage2/train_vqa_stage2.py", "Stage0/evaluate_stage0.py", "Stage0/inference_stage0.py",
                "Stage2/evaluate.py", "Stage2/inference_vqa_stage2.py", "scripts/data/preprocess_images.py",
                "scripts/data/validate_data.py", "scripts/data/convert_dataset.py", "scripts/bench/size_audit.py",
                "scripts/plot_run.py"]
HELP_PROBE = """
import runpy, sys
sys.argv = [sys.argv[1], "--help"]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit as e:
    assert e.code in (0, None), e.code
heavy = sorted(m for m in ("torch", "transformers", "accelerate", "peft") if m in sys.modules)
print("HEAVY", ",".join(heavy))
"""


@pytest.mark.parametrize("script", ENTRY_POINTS)
def test_help_comes_before_the_heavy_imports(script):
    """--help took 7-11 s on every training, evaluation and inference CLI: argparse ran after
    torch, transformers and accelerate were imported. It now runs before them."""
    out = subprocess.run([sys.executable, "-c", HELP_PROBE, str(ROOT / script)], capture_output=True, text=True,
                         cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "usage:" in out.stdout and "--help" in out.stdout
    assert out.stdout.splitlines()[-1] == "HEAVY ", out.stdout.splitlines()[-1]  # none of them
