from scripts.benchmark import main


def test_benchmark_runs_and_chunked_loss_keeps_less_for_backward():
    # saved-tensor bytes are deterministic (not a timing): the naive loss keeps B x B tensors
    (row,) = main(["--device", "cpu", "--only", "siglip_mem", "--repeats", "1"])
    assert row["reduction"] > 5
