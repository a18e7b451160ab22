import importlib.util
import json

import pytest
import torch

from scripts.bench.bench_core import lm_body_params, lm_head_flops, n_params, tower_flops
from scripts.bench.bench_peers import _complete
from scripts.benchmark import ROWS, main


def test_benchmark_runs_and_chunked_loss_keeps_less_for_backward():
    # saved-tensor bytes are deterministic (not a timing): the naive loss keeps B x B tensors
    (row,) = main(["--device", "cpu", "--only", "siglip_mem", "--repeats", "1"])
    assert row["reduction"] > 5


def test_quick_mode_writes_json_and_markdown_with_the_environment(tmp_path):
    rows = main(["--device", "cpu", "--quick", "--only", "mfu_reference", "siglip_mem", "--output_json",
                 str(tmp_path / "b.json"), "--output_md", str(tmp_path / "b.md")])
    data = json.loads((tmp_path / "b.json").read_text())
    assert {"device", "torch", "transformers", "dtype", "attention", "compile", "timing", "memory",
            "flop_formulas"} <= set(data)
    assert [r["row"] for r in data["rows"]] == ["mfu_reference", "siglip_mem"] == [r["row"] for r in rows]
    md = (tmp_path / "b.md").read_text()
    assert "| siglip_mem |" in md and "mfu_reference:" in md and "torch " in md and "compile off" in md


def test_a_failing_row_is_recorded_and_named_in_one_line(monkeypatch, capsys):
    from scripts.bench import bench_peers

    def broken(args):
        raise RuntimeError("CUDA error: no kernel image is available\nmore detail")
    monkeypatch.setattr(bench_peers, "bench_generation", broken)
    rows = main(["--device", "cpu", "--quick", "--only", "generation", "siglip_mem"])
    assert rows[0] == {"row": "generation", "error": "RuntimeError: CUDA error: no kernel image is available",
                       "comparison": "peer"}
    assert rows[1]["row"] == "siglip_mem" and rows[1]["reduction"] > 5
    assert ("scripts/benchmark.py: row generation failed (RuntimeError: CUDA error: no kernel image is available)"
            in capsys.readouterr().err)


def test_flop_formulas_on_the_siglip_b16_and_gemma3_1b_presets():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, SiglipVisionConfig, SiglipVisionModel

    from scripts.demo.make_tiny_models import GEMMA3_PRESETS, SIGLIP_PRESETS
    s = SIGLIP_PRESETS["b16-224"]
    g = GEMMA3_PRESETS["1b"]
    with torch.device("meta"):  # shapes only, no memory
        vit = SiglipVisionModel(SiglipVisionConfig(
            image_size=s["image_size"], patch_size=s["patch_size"], hidden_size=s["hidden_size"],
            intermediate_size=s["intermediate_size"], num_hidden_layers=s["num_layers"],
            num_attention_heads=s["num_heads"]))
        lm = Gemma3ForCausalLM(Gemma3TextConfig(
            vocab_size=g["model_vocab_size"], hidden_size=g["hidden_size"], intermediate_size=g["intermediate_size"],
            num_hidden_layers=g["num_layers"], num_attention_heads=g["num_heads"], num_key_value_heads=1,
            head_dim=g["head_dim"], tie_word_embeddings=True))
    # The released sizes: SigLIP B/16's vision tower (blocks, patch and position embeddings,
    # attention-pooling head) and google/gemma-3-1b (tied embeddings).
    n_vit, n_lm, table = 92_884_224, 999_885_952, 262_144 * 1152
    assert n_params(vit) == n_vit
    assert n_params(lm) == n_lm
    t = 196  # (224 / 16)^2 patches
    assert tower_flops(vit, "trained") == 6 * n_vit * t + 12 * 12 * t ** 2 * 768  # 6NT + 12 L T^2 d
    assert tower_flops(vit, "frozen") == 2 * n_vit * t
    assert lm_body_params(lm.model) == n_lm - table  # the embedding table is a lookup, the head its own term
    assert lm_head_flops(262_144, 1152, 10, "trained") == 3 * lm_head_flops(262_144, 1152, 10, "forward")
    assert lm_head_flops(262_144, 1152, 10, "grad_through") == 2 * 2 * 262_144 * 1152 * 10


def test_cpu_peak_memory_counts_live_allocations_not_views_or_freed_ones():
    from scripts.bench.bench_core import LivePeak
    mib = 2 ** 20
    weight = torch.ones(256, 1024)  # 1 MiB that exists before: never counted
    with LivePeak() as live:
        a = torch.empty(1024, 1024)  # 4 MiB
        view = a.t()
        c = torch.empty(2048, 1024)  # 8 MiB: 12 live
        w_t = weight.t().contiguous()  # 1 MiB: 13 live
        del a, view
        d = torch.empty(1024, 1024)  # 4 MiB again, after a was freed: still 13
        weight.mul_(2)  # in place on a tensor from before: nothing new
    assert live.peak == 13 * mib
    del c, d, w_t

    x = torch.randn(512, 64, requires_grad=True)
    with LivePeak() as live:  # backward runs through the tracker too
        (x @ x.T).sigmoid().sum().backward()
    assert live.peak >= 2 * 512 * 512 * 4  # the [512, 512] activation and its gradient


def test_every_result_gets_its_ratio_to_the_peer_it_names():
    results = _complete([{"path": "peer", "role": "peer", "time_s": 2.0, "peak_MiB": 300.0, "flops": 4e9},
                         {"path": "ours", "role": "ours", "vs": "peer", "time_s": 0.5, "peak_MiB": 100.0, "flops": 2e9},
                         {"path": "big peer", "role": "peer", "error": "out of memory"},
                         {"path": "ours 2", "role": "ours", "vs": "big peer", "time_s": 1.0, "peak_MiB": None}],
                        samples=8, peak_flops=1e10, gemm_flops=5e9)
    peer, ours, _, ours2 = results
    assert ours["speedup_vs_peer"] == 4.0 and ours["memory_vs_peer"] == 3.0
    assert ours["throughput"] == 16.0 and ours["mfu"] == pytest.approx(0.4) and peer["mfu"] == pytest.approx(0.2)
    assert ours["mfu_vs_gemm"] == pytest.approx(0.8)  # the measured GEMM is below the datasheet peak
    assert ours2["speedup_vs_peer"] == "peer: out of memory" and "memory_vs_peer" not in ours2
    no_peak = _complete([{"path": "ours", "role": "ours", "time_s": 0.5, "flops": 2e9}], samples=8, peak_flops=None,
                        gemm_flops=5e9)
    assert no_peak[0]["mfu"] is None and no_peak[0]["mfu_vs_gemm"] == pytest.approx(0.8)


def test_mfu_is_against_the_datasheet_dense_bf16_peak():
    from scripts.bench.bench_core import datasheet_peak
    from scripts.benchmark import mfu_peak
    # torch.cuda.get_device_name() of each (dense numbers: half the datasheets' "with sparsity" ones)
    expected = {"NVIDIA H100 80GB HBM3": 989.4, "NVIDIA H100 PCIe": 756.0, "NVIDIA H200": 989.4,
                "NVIDIA A100-SXM4-80GB": 312.0, "NVIDIA A100 80GB PCIe": 312.0, "NVIDIA L40S": 362.05,
                "NVIDIA A10G": 125.0, "NVIDIA L4": 121.0, "NVIDIA GeForce RTX 4090": 165.2}
    assert {name: datasheet_peak(name)[0] for name in expected} == expected
    assert datasheet_peak("Tesla V100-SXM2-16GB") is None  # no bf16 tensor cores
    assert mfu_peak("cpu") == (None, "no peak known: a CPU")
    assert mfu_peak("cpu", 100.0) == (100e12, "--peak_tflops")


def test_quick_cpu_run_mfu_column_peers_doing_the_same_work_and_ablation_labels(tmp_path):
    """On CPU the MFU column says there is no datasheet peak (the GEMM column still fills); the
    frozen-text step's peer trains exactly what ours trains (its text tower frozen too) and the
    both-towers step's peer both towers; the project-vs-itself rows are labelled ablations."""
    main(["--device", "cpu", "--quick", "--only", "mfu_reference", "stage0_step", "text_cache", "siglip_mem",
          "--output_json", str(tmp_path / "b.json"), "--output_md", str(tmp_path / "b.md")])
    data = json.loads((tmp_path / "b.json").read_text())
    assert data["peak_tflops"] is None and data["peak_source"] == "no peak known: a CPU"
    assert "do not carry over to a GPU" in data["note"]
    by = {r["row"]: r for r in data["rows"]}
    results = {r["path"]: r for r in by["stage0_step"]["results"]}
    for r in results.values():  # the ratios' arithmetic: test_every_result_gets_its_ratio_to_the_peer_it_names
        assert r["mfu"] is None and r["mfu_vs_gemm"] is not None, r
    pairs = [(r, results[r["vs"]]) for r in results.values() if r["role"] == "ours"]
    assert len(pairs) == 2
    for ours, peer in pairs:
        assert peer["trained_params"] == ours["trained_params"] and peer["flops"] == ours["flops"], (ours, peer)
    peer_of = {"frozen" if "frozen text" in ours["path"] else "both": peer for ours, peer in pairs}
    frozen_peer, both_peer = peer_of["frozen"], peer_of["both"]
    assert "text tower frozen" in frozen_peer["path"] and "both towers" in both_peer["path"]
    assert frozen_peer["trained_params"] < both_peer["trained_params"]
    assert by["text_cache"]["comparison"] == "ablation" and by["siglip_mem"]["comparison"] == "peer"
    assert by["stage0_step"]["comparison"] == "peer"
    md = (tmp_path / "b.md").read_text()
    assert "no peak known" in md and "MFU vs measured GEMM" in md and "do not carry over to a GPU" in md
    assert "| text_cache | ablation |" in md and "| siglip_mem | peer |" in md
    assert md.index("ablations:") > md.index("| siglip_mem | peer |")


def test_the_llava_peer_optimises_the_same_loss_as_the_project(tmp_path):
    # The stage rows compare speed, so the peer must compute the same objective: mean
    # cross-entropy over the answer tokens, only with logits at every position.
    from types import SimpleNamespace

    from scripts.bench.bench_peers import ModelFolders, _stage2_batch, _vlm, llava_concat_loss
    from vlm import lm_loss_on_supervised
    args = SimpleNamespace(models=ModelFolders(tmp_path), vlm_preset="tiny", lm_preset="tiny")
    model, tokenizer, _ = _vlm(args)
    batch = _stage2_batch(model, tokenizer, 2, 12)
    with torch.no_grad():
        ours = lm_loss_on_supervised(model, batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
                                     batch["labels"])
        peer = llava_concat_loss(model, batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
                                 batch["labels"])
    assert (batch["labels"] != -100).sum() == 2 * 12
    torch.testing.assert_close(peer, ours, rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # ~1.5 min on 2 cores; the tokenize row reads the packaged Gemma 3 tokenizer
def test_quick_mode_runs_every_row_and_writes_json_and_markdown(tmp_path):
    rows = main(["--device", "cpu", "--quick", "--output_json", str(tmp_path / "b.json"),
                 "--output_md", str(tmp_path / "b.md")])
    data = json.loads((tmp_path / "b.json").read_text())
    assert {"device", "torch", "transformers", "dtype", "attention", "compile", "timing", "memory"} <= set(data)
    assert not [r for r in data["rows"] if "error" in r]  # a failed row is recorded, not raised
    names = {r["row"] for r in data["rows"]}
    assert set(ROWS) - {"data"} <= names and len(data["rows"]) == len(rows)
    by = {r["row"]: r for r in data["rows"]}

    for name in ("stage0_step", "stage1_step", "stage2_step"):
        results = by[name]["results"]
        peers = [r for r in results if r["role"] == "peer"]
        ours = [r for r in results if r["role"] == "ours"]
        assert peers and ours, name
        by_path = {r["path"]: r for r in results}
        # peer and ours process the same samples: throughput x time is one number per row
        assert len({round(r["throughput"] * r["time_s"], 6) for r in peers + ours}) == 1, (name, results)
        for r in peers + ours:  # MFU needs a datasheet peak, which a CPU has not
            assert r["mfu"] is None and r["mfu_vs_gemm"] is not None, (name, r)
        for r in ours:
            assert r["vs"] in by_path and "speedup_vs_peer" in r, (name, r)
            if name != "stage0_step":  # the peer's logits at every position are more work
                assert next(p for p in peers if p["path"] == r["vs"])["flops"] > r["flops"]

    loss = {(r["path"].split(":")[0].split(" ")[0], r["B"]): r for r in by["siglip_loss"]["results"]}
    ours, eager = loss[("ours", 8192)], loss[("eager", 8192)]
    # the chunked loss agrees with the float32 reference and never holds the whole B x B matrix
    assert ours["grad_max_abs_diff"] < 1e-3 * ours["grad_max_abs_ref"]
    assert ours["peak_MiB"] < eager["peak_MiB"]
    assert eager["ours_memory_ratio"] > 1
    open_clip = loss[("open_clip", 8192)]
    if importlib.util.find_spec("open_clip") is None:
        assert "not installed" in open_clip["error"]
    else:
        assert "time_s" in open_clip, open_clip

    gen = {r["path"]: r for r in by["generation"]["results"]}
    assert len(gen) == 2 and all("error" not in r for r in gen.values()), gen
    assert sum("decode_speedup" in r for r in gen.values()) == 1  # one path's ratio to the other

    md = (tmp_path / "b.md").read_text()
    for name in ("stage0_step", "stage1_step", "stage2_step"):
        assert f"| {name} | ours" in md and f"| {name} | peer" in md
    assert "siglip_loss:" in md and "generation:" in md and "mfu_reference:" in md and "torch " in md
    assert "| siglip_mem | peer |" in md and "| tokenize | ablation |" in md
    assert by["tokenize"]["comparison"] == "ablation"
    assert all(r["comparison"] == "ablation" for r in data["rows"] if r["row"].startswith("data"))


def test_environment_states_the_dtype_the_trainers_trained_in(tmp_path):
    """Read from the models the trainers built, not a fixed string: a bf16-stored checkpoint
    once trained in bf16 while the line claimed float32."""
    main(["--device", "cpu", "--quick", "--only", "stage2_step", "--output_json", str(tmp_path / "b.json")])
    data = json.loads((tmp_path / "b.json").read_text())
    assert "trained weights float32," in data["dtype"], data["dtype"]
    trained = [r["trained_dtype"] for row in data["rows"] for r in row.get("results", []) if "trained_dtype" in r]
    assert trained and set(trained) == {"float32"}
