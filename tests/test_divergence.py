"""A loss that runs away but stays finite stops every stage with a checkpoint and one line.
Before, at lr 1e3, Stage1's projector weights went from 0.1 to 4142 and Stage2's loss from 6.6
to 1.9e7, and both exited 0 with an exported model: the watch's median had by then taken in
the diverged losses. Stage0 and its recipes stopped through the non-finite guard."""
import json
import math
import random

import pytest

from scripts.demo.make_tiny_models import _texts_from_files, build_tiny_gemma3
from training.checkpoints import list_checkpoints
from training.watch import DivergenceWatch


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    pass


def test_runaway_is_judged_against_the_level_before_it():
    rng = random.Random(0)
    # A normal run: steep noisy start, slow decrease, single 6x spikes: never a runaway.
    watch = DivergenceWatch()
    normal = [500 * math.exp(-i / 3) + 8 * math.exp(-i / 80) + 0.3 for i in range(400)]
    for i, v in enumerate(normal):
        watch.update(i, v * math.exp(rng.gauss(0, 0.3)) * (6 if i % 97 == 50 else 1))
    assert watch.runaway is None
    # An over-fitted tail with one lucky batch 10x below the others: still not a runaway.
    watch = DivergenceWatch()
    for i, v in enumerate([2.0] * 5 + [0.1 * math.exp(rng.gauss(0, 0.4)) for _ in range(50)] + [0.01] + [0.15] * 20):
        watch.update(i, v)
    assert watch.runaway is None
    # Stage2 at lr 1e3: 6.6, then up by orders of magnitude within a few logged steps.
    watch = DivergenceWatch()
    for i, v in enumerate([6.6, 6.4, 9.0, 3e3, 2e5, 1.9e7, 1e7]):
        watch.update(i + 1, v)
    assert watch.runaway == {"step": 6, "loss": 1.9e7, "baseline": 6.5, "logged": 3}


@pytest.fixture(scope="module")
def towers(tmp_path_factory, demo_dir, tiny_siglip):
    texts = _texts_from_files([demo_dir / "stage2_train.json", demo_dir / "stage1_train.json"])
    gemma = build_tiny_gemma3(tmp_path_factory.mktemp("div") / "gemma3", texts, hidden_size=32, num_layers=1,
                              num_heads=2, vocab_size=300)
    return {"siglip": tiny_siglip, "gemma3": gemma}


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_lr_1e3_stops_with_a_checkpoint_and_one_line(stage, towers, demo_dir, tmp_path):
    out = tmp_path / "out"
    argv = ["--vision_model_name", str(towers["siglip"]), "--llm_name", str(towers["gemma3"]), "--image_root",
            str(demo_dir), "--output_dir", str(out), "--batch_size", "8", "--learning_rate", "1e3", "--max_steps", "40",
            "--warmup_steps", "0", "--lr_scheduler", "constant", "--logging_steps", "1", "--num_workers", "0",
            "--report_to", "none", "--no-save_every_epoch"]
    if stage == "stage1":
        from Stage1.train_projection_stage1 import main
        argv += ["--train_json", str(demo_dir / "stage1_train.json"), "--max_caption_len", "24"]
    else:
        from Stage2.train_vqa_stage2 import main
        argv += ["--train_json", str(demo_dir / "stage2_train.json"), "--max_a_len", "12"]
    with pytest.raises(SystemExit) as stop:
        main(argv)
    message = stop.value.code
    # Stage1's small random LM ignores its inputs, so its loss stays at log(V) while the
    # projector's weights blow up; Stage2's loss runs away.
    what = "the trained weights ran away: " if stage == "stage1" else "the loss ran away: "
    assert isinstance(message, str) and message.startswith("error: " + what), message
    assert "\n" not in message and "--learning_rate" in message and "--overwrite_output_dir" in message
    (ckpt,) = list_checkpoints(out)
    assert str(ckpt) in message
    assert not (out / "final_model").exists()
    losses = [json.loads(line)["train/loss"] for line in (out / "metrics.jsonl").read_text().splitlines()
              if "train/loss" in line]
    assert len(losses) < 40
    if stage == "stage2":
        assert max(losses) > 10 * losses[0]
