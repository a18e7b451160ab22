from scripts.benchmark import main


def test_benchmark_runs_and_chunked_loss_keeps_less_for_backward():
    # saved-tensor bytes are deterministic (not a timing): the naive loss keeps B x B tensors
    (row,) = main(["--device", "cpu", "--only", "siglip_mem", "--repeats", "1"])
    assert row["reduction"] > 5


def test_quick_mode_writes_json_and_markdown_with_the_environment(tmp_path):
    import json
    rows = main(["--device", "cpu", "--quick", "--only", "siglip_mem", "tokenize", "--output_json",
                 str(tmp_path / "b.json"), "--output_md", str(tmp_path / "b.md")])
    data = json.loads((tmp_path / "b.json").read_text())
    assert {"device", "torch", "transformers", "dtype", "attention", "compile"} <= set(data)
    assert [r["row"] for r in data["rows"]] == ["siglip_mem", "tokenize"] == [r["row"] for r in rows]
    md = (tmp_path / "b.md").read_text()
    assert "| siglip_mem |" in md and "| tokenize |" in md and "torch " in md
