import argparse
import json
import warnings

import pytest
import torch

import accelerator_setup as acc_setup
from accelerator_setup import setup_accelerator_and_logging
from cli import add_common_args
from training.checkpoints import list_checkpoints, load_checkpoint, resolve_resume, save_checkpoint
from training.watch import log_metrics


def _args(tmp_path, *extra):
    return add_common_args(argparse.ArgumentParser()).parse_args(
        ["--output_dir", str(tmp_path), "--report_to", "none", *extra])


def test_checkpoints_rotate_and_resume_latest(tmp_path):
    acc = setup_accelerator_and_logging(_args(tmp_path))
    model = acc.prepare(torch.nn.Linear(2, 2))
    for step in (2, 4, 6):
        with torch.no_grad():
            model.weight.fill_(step)
        save_checkpoint(acc, tmp_path, step, {"epoch": 0, "batches_done": step}, total_limit=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_4", "step_6"]
    # a half-written save (no trainer_state.json) is never taken for a checkpoint
    (tmp_path / "checkpoints" / ".tmp_step_8").mkdir()
    (tmp_path / "checkpoints" / "step_9").mkdir()
    latest = resolve_resume(tmp_path, "latest")
    assert latest.name == "step_6"
    with torch.no_grad():
        model.weight.zero_()
    state = load_checkpoint(acc, latest)
    assert state == {"step": 6, "epoch": 0, "batches_done": 6}
    assert torch.all(model.weight == 6)


def test_resolve_resume_fresh_and_bad_path(tmp_path):
    assert resolve_resume(tmp_path, None) is None
    assert resolve_resume(tmp_path, "latest") is None  # launchers always pass latest
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        resolve_resume(tmp_path, str(tmp_path / "nope"))


def test_wandb_without_login_goes_offline(tmp_path, monkeypatch):
    for k in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    with pytest.warns(UserWarning, match="offline"):
        assert acc_setup._tracker(_args(tmp_path, "--report_to", "wandb"), tmp_path) == "wandb"
    import os
    assert os.environ["WANDB_MODE"] == "offline"


def test_tracker_that_fails_to_start_falls_back(tmp_path, monkeypatch):
    monkeypatch.setattr(acc_setup, "_tracker", lambda args, out: "tensorboard")

    def boom(*a, **k):
        raise RuntimeError("no tracker today")
    monkeypatch.setattr("accelerate.Accelerator.init_trackers", boom)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        acc = setup_accelerator_and_logging(_args(tmp_path))
    assert any("could not start tensorboard" in str(x.message) for x in w)
    log_metrics(acc, {"loss": 1.5}, step=3)  # still logs to metrics.jsonl
    assert '"loss": 1.5' in (tmp_path / "metrics.jsonl").read_text()


def test_length_grouped_sampler_keeps_every_sample_once_and_is_deterministic():
    from training.data import LengthGroupedSampler
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(5, 500, (1003,), generator=g).tolist()
    s = LengthGroupedSampler(lengths, batch_size=8, seed=3, group=10)
    s.set_epoch(0)
    e0 = list(s)
    assert sorted(e0) == list(range(1003))
    assert e0 == list(LengthGroupedSampler(lengths, batch_size=8, seed=3, group=10))  # same seed and epoch
    s.set_epoch(1)
    assert list(s) != e0 and sorted(s) == list(range(1003))

    def spread(order):  # mean (max - min) length inside the batches of 8
        batches = [order[i:i + 8] for i in range(0, len(order), 8)]
        return sum(max(lengths[j] for j in b) - min(lengths[j] for j in b) for b in batches) / len(batches)
    random_order = torch.randperm(1003, generator=g).tolist()
    assert spread(e0) < spread(random_order) / 5


def test_an_output_folder_holding_another_run_is_never_reused_silently(tiny_siglip, demo_dir, tmp_path, capsys):
    """A fresh run into a folder with another run's checkpoints refuses (rotation used to delete
    the new run's checkpoints and keep the old ones); `latest` with another learning rate is
    refused naming it; --overwrite_output_dir starts over; a finished run says it has nothing
    to train."""
    from Stage0.train_vision_encoder_stage0 import main
    base = ["--model_name", str(tiny_siglip), "--train_json", str(demo_dir / "stage0_train.json"), "--image_root",
            str(demo_dir), "--output_dir", str(tmp_path), "--batch_size", "16", "--num_workers", "0",
            "--report_to", "none", "--no-save_epoch_models", "--max_steps", "2", "--checkpointing_steps", "1"]
    main(base)
    old = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    with pytest.raises(SystemExit, match="holds another run"):
        main(base)
    with pytest.raises(SystemExit, match=r"learning_rate: 1e-05 -> 0\.001"):
        main(base + ["--resume_from_checkpoint", "latest", "--learning_rate", "1e-3"])
    assert json.loads((tmp_path / "args.json").read_text())["learning_rate"] == 1e-5  # the record stays true
    capsys.readouterr()
    main(base + ["--resume_from_checkpoint", "latest"])
    assert "nothing to train" in capsys.readouterr().err
    main(base + ["--overwrite_output_dir", "--max_steps", "1"])
    assert old == ["step_1", "step_2"] and [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_1"]


def test_an_explicit_checkpoint_of_another_configuration_is_refused_before_loading(tiny_siglip, demo_dir,
                                                                                  short_caption_jsons, tmp_path):
    """Other data, or another process count (another global batch and data order), would be
    resumed half-right; the refusal names what differs. The same settings resume anywhere."""
    from Stage0.train_vision_encoder_stage0 import main
    base = ["--model_name", str(tiny_siglip), "--image_root", str(demo_dir), "--batch_size", "16",
            "--num_workers", "0", "--report_to", "none", "--no-save_epoch_models", "--max_steps", "2",
            "--checkpointing_steps", "1"]
    train = ["--train_json", str(demo_dir / "stage0_train.json")]
    main(base + train + ["--output_dir", str(tmp_path / "a")])
    ckpt = tmp_path / "a" / "checkpoints" / "step_1"
    with pytest.raises(SystemExit, match=r"step_1 was written by a run with other settings: train_json: .*short_train"):
        main(base + ["--train_json", str(short_caption_jsons["train"]), "--output_dir", str(tmp_path / "b"),
                     "--resume_from_checkpoint", str(ckpt)])
    assert not (tmp_path / "b" / "final_model").exists()
    saved = json.loads((tmp_path / "a" / "args.json").read_text())
    assert saved["num_processes"] == 1
    (tmp_path / "a" / "args.json").write_text(json.dumps({**saved, "num_processes": 2}))
    with pytest.raises(SystemExit, match=r"num_processes: 2 -> 1"):
        main(base + train + ["--output_dir", str(tmp_path / "c"), "--resume_from_checkpoint", str(ckpt)])
    (tmp_path / "a" / "args.json").write_text(json.dumps(saved))
    main(base + train + ["--output_dir", str(tmp_path / "d"), "--resume_from_checkpoint", str(ckpt)])
    assert (tmp_path / "d" / "final_model").is_dir()


def test_overwrite_output_dir_moves_the_old_run_aside_whole(tiny_siglip, demo_dir, tmp_path):
    """Deleting only checkpoints/ left the old run's best_model/ (and its val loss, which the
    new run then had to beat) and appended to its metrics.jsonl; and it deleted them before the
    new run's data check, so a typo in the new command lost the old run."""
    from Stage0.train_vision_encoder_stage0 import main
    out = tmp_path / "run"
    base = ["--model_name", str(tiny_siglip), "--image_root", str(demo_dir), "--output_dir", str(out),
            "--batch_size", "16", "--num_workers", "0", "--report_to", "none", "--no-save_epoch_models",
            "--checkpointing_steps", "1", "--val_json", str(demo_dir / "stage0_val.json")]
    main(base + ["--train_json", str(demo_dir / "stage0_train.json"), "--num_epochs", "1"])
    assert (out / "best_model").is_dir()
    old_files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"image": "missing.png", "caption": "x"}] * 20))
    from data_check import BadDataError
    # one line, not an IndexError from the tokenizer
    with pytest.raises(BadDataError, match="every row of .*bad.json \\(train\\) is bad \\(20 rows"):
        main(base + ["--train_json", str(bad), "--overwrite_output_dir", "--max_steps", "1"])
    (aside,) = [p for p in tmp_path.iterdir() if p.name.startswith("run.previous-")]
    assert sorted(str(p.relative_to(aside)) for p in aside.rglob("*") if p.is_file()) == old_files  # all kept
    main(base + ["--train_json", str(demo_dir / "stage0_train.json"), "--overwrite_output_dir", "--max_steps", "1"])
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(m["step"] for m in logged) == 1  # none of the old run's 15 steps
    assert not (out / "best_model").exists()  # nor its best model, which the new run would have had to beat
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_1"]


def test_a_step_is_saved_once_and_accelerate_lists_no_files(tiny_siglip, demo_dir, tmp_path, capfd):
    """A periodic save that meets the epoch end used to write the same step twice, and
    accelerate's line per saved file made up most of a run's log (72 of 121 lines)."""
    import accelerator_setup
    from Stage0.train_vision_encoder_stage0 import main
    rows = json.loads((demo_dir / "stage0_train.json").read_text())[:32]
    (tmp_path / "train.json").write_text(json.dumps(rows))
    saves = []
    real = accelerator_setup.Accelerator.save_state

    def counted(self, *a, **k):
        saves.append(a[0] if a else k.get("output_dir"))
        return real(self, *a, **k)
    accelerator_setup.Accelerator.save_state = counted
    try:
        main(["--model_name", str(tiny_siglip), "--train_json", str(tmp_path / "train.json"), "--image_root",
              str(demo_dir), "--output_dir", str(tmp_path / "out"), "--batch_size", "8", "--num_workers", "0",
              "--report_to", "none", "--no-save_epoch_models", "--num_epochs", "2", "--checkpointing_steps", "4"])
    finally:
        accelerator_setup.Accelerator.save_state = real
    assert len(saves) == 2, saves  # steps 4 and 8: each an epoch end as well
    state = json.loads((tmp_path / "out" / "checkpoints" / "step_4" / "trainer_state.json").read_text())
    assert state == {"step": 4, "epoch": 1, "batches_done": 0}  # the position after the epoch's end
    err = capfd.readouterr().err
    assert "Saving current state" not in err and "saved resume checkpoint" in err


@pytest.mark.parametrize("total,warmup", [(2, 1), (10, 1), (10, 0), (10, 3), (3, 3), (1, 0)])
def test_one_cycle_schedule_takes_any_warmup_and_peaks_after_it(total, warmup):
    """One warm-up step made OneCycleLR's first phase zero steps long: a ZeroDivisionError at
    the first step of any short knee run whose warm-up ratio rounded to one step."""
    import math
    from types import SimpleNamespace

    from training.step import make_scheduler
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([param], lr=1.0)
    sched = make_scheduler(opt, SimpleNamespace(warmup_steps=warmup, warmup_ratio=0.0, lr_scheduler="one_cycle"),
                           total)
    lrs = []
    for _ in range(total):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert all(math.isfinite(lr) for lr in lrs)
    if total >= 3:
        assert max(lrs) == pytest.approx(1.0) and lrs[0] < 0.1  # warms up from max_lr / 25
        assert lrs.index(max(lrs)) == min(max(warmup, 2), total - 1) - 1       # OneCycleLR's peak: the last warm-up step
        assert lrs[-1] < lrs[lrs.index(max(lrs))]               # and anneals after it


def test_an_unreadable_args_json_does_not_block_a_resume(tmp_path, caplog):
    """args.json cut short by a crash (or edited into something else): the settings cannot be
    compared, which is said, and the checkpoints still resume (a JSONDecodeError traceback before)."""
    from training.checkpoints import _changed_settings
    saved = tmp_path / "args.json"
    for text in ("", "{\"learning_rate\": 1e-", "[1, 2]"):
        saved.write_text(text)
        caplog.clear()
        assert _changed_settings(saved, argparse.Namespace(learning_rate=1e-5)) == []
        assert f"{saved} is unreadable" in caplog.text
    saved.write_text(json.dumps({"learning_rate": 1e-4}))
    assert _changed_settings(saved, argparse.Namespace(learning_rate=1e-5)) == ["learning_rate: 0.0001 -> 1e-05"]
