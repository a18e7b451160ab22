"""`--max_steps` means one thing in every stage: the total number of optimizer steps, repeating
epochs as needed, with the LR schedule spanning exactly those steps. Before, Stage0 took the
smaller of the two counts while Stage1/Stage2 sized the schedule for --max_steps and stopped at
--num_epochs, so cosine decay never finished."""
import json

import pytest

from scripts.demo.make_tiny_models import _texts_from_files, build_tiny_gemma3


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    pass


@pytest.fixture(scope="module")
def gemma(tmp_path_factory, demo_dir):
    texts = _texts_from_files([demo_dir / "stage2_train.json", demo_dir / "stage1_train.json"])
    return build_tiny_gemma3(tmp_path_factory.mktemp("ms") / "gemma3", texts, hidden_size=32, num_layers=1,
                             num_heads=2, vocab_size=300)


def _subset(demo_dir, tmp_path, name, n):
    rows = json.loads((demo_dir / name).read_text())[:n]
    path = tmp_path / name
    path.write_text(json.dumps(rows))
    return path


def _logged(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "train/lr" in r]


def _argv(stage, demo_dir, tmp_path, tiny_siglip, gemma):
    common = ["--output_dir", str(tmp_path / "out"), "--batch_size", "4", "--num_epochs", "1", "--max_steps", "7",
              "--warmup_steps", "1", "--lr_scheduler", "cosine", "--learning_rate", "1e-3", "--logging_steps", "1",
              "--num_workers", "0", "--report_to", "none", "--image_root", str(demo_dir)]
    if stage == "stage0":
        from Stage0.train_vision_encoder_stage0 import main
        return main, ["--model_name", str(tiny_siglip), "--no-save_epoch_models",
                      "--train_json", str(_subset(demo_dir, tmp_path, "stage0_train.json", 12)), *common]
    vlm = ["--vision_model_name", str(tiny_siglip), "--llm_name", str(gemma), "--no-save_every_epoch"]
    if stage == "stage1":
        from Stage1.train_projection_stage1 import main
        return main, [*vlm, "--max_caption_len", "24",
                      "--train_json", str(_subset(demo_dir, tmp_path, "stage1_train.json", 12)), *common]
    from Stage2.train_vqa_stage2 import main
    return main, [*vlm, "--max_a_len", "12", "--train_json", str(_subset(demo_dir, tmp_path, "stage2_train.json", 12)),
                  *common]


@pytest.mark.parametrize("stage", ["stage0", "stage1", "stage2"])
def test_max_steps_is_the_total_and_the_schedule_ends_with_it(stage, demo_dir, tmp_path, tiny_siglip, gemma):
    """12 rows, batch 4: 3 steps an epoch. --num_epochs 1 --max_steps 7 trains 7 steps over 3
    epochs (the last cut short), and cosine decay reaches 0 at step 7."""
    main, argv = _argv(stage, demo_dir, tmp_path, tiny_siglip, gemma)
    trainer = main(argv)
    logged = _logged(tmp_path / "out")
    assert [r["step"] for r in logged] == list(range(1, 8)), [r["step"] for r in logged]
    assert trainer.total_steps == 7
    lr = trainer.scheduler.get_last_lr()[0]
    assert lr == pytest.approx(0.0, abs=1e-12), lr
