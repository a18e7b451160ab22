"""The speed flags every stage shares (--attn_implementation, --gradient_checkpointing,
--torch_compile): each does what it says and none changes what is learned."""
import argparse

import pytest
import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig

from cli import add_common_args
from training.speed import (
    CompileWatch,
    check_attn_implementation,
    compile_modules,
    enable_gradient_checkpointing,
    set_attention,
)


def _lm():
    torch.manual_seed(0)
    cfg = Gemma3TextConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    return Gemma3ForCausalLM(cfg).eval().requires_grad_(False)


def _count_block_calls(lm):
    calls = []
    for layer in lm.model.layers:
        layer.self_attn.register_forward_hook(lambda *a: calls.append(1))
    return calls


def _grad_through_frozen_lm(lm):
    """The Stage1 situation: a frozen LM in eval mode; the gradient reaches its input embeddings
    (the projector's output)."""
    torch.manual_seed(1)
    embeds = torch.randn(2, 7, 32, requires_grad=True)
    lm(inputs_embeds=embeds).logits.float().logsumexp(-1).sum().backward()
    return embeds.grad


def test_checkpointing_recomputes_frozen_blocks_with_the_same_gradient():
    plain, ckpt = _lm(), _lm()
    enable_gradient_checkpointing([ckpt])
    calls_plain, calls_ckpt = _count_block_calls(plain), _count_block_calls(ckpt)
    g_plain, g_ckpt = _grad_through_frozen_lm(plain), _grad_through_frozen_lm(ckpt)
    assert len(calls_plain) == 2
    assert len(calls_ckpt) == 4  # each block's forward again in backward: the activations were not kept
    torch.testing.assert_close(g_ckpt, g_plain, rtol=0, atol=0)
    assert not any(m.training for m in ckpt.modules() if isinstance(m, torch.nn.Dropout))


def test_checkpointing_leaves_generation_alone():
    plain, ckpt = _lm(), _lm()
    enable_gradient_checkpointing([ckpt])
    ids = torch.tensor([[1, 5, 9, 3]])
    calls = _count_block_calls(ckpt)
    a = plain.generate(ids, max_new_tokens=6, do_sample=False)
    b = ckpt.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(a, b)
    assert len(calls) == 2 * 6  # one pass per new token: the KV cache was kept


def test_attention_kernel_is_set_on_every_tower_and_agrees():
    lm = _lm()
    wrapper = torch.nn.ModuleDict({"a": lm, "b": torch.nn.Linear(2, 2)})
    ids = torch.tensor([[1, 5, 9, 3, 7]])
    set_attention(wrapper, "sdpa")
    ref = lm(input_ids=ids).logits
    set_attention(wrapper, "eager")
    assert lm.config._attn_implementation == "eager"
    torch.testing.assert_close(lm(input_ids=ids).logits, ref, rtol=1e-4, atol=1e-5)


def test_flash_attention_without_the_package_is_refused_in_one_line():
    from transformers.utils import is_flash_attn_2_available
    if is_flash_attn_2_available():
        pytest.skip("flash-attn is installed here")
    with pytest.raises(SystemExit, match="flash_attention_2 needs the flash-attn package.*sdpa"):
        check_attn_implementation("flash_attention_2")
    check_attn_implementation("sdpa")


def test_compile_keeps_weights_names_and_outputs_and_counts_recompiles(capfd):
    torch._dynamo.reset()
    lm, ref = _lm(), _lm()
    keys = list(lm.state_dict())
    args = argparse.Namespace(torch_compile=True, torch_compile_backend="eager", torch_compile_mode=None)
    compile_modules([lm], args)
    assert list(lm.state_dict()) == keys  # checkpoints and exports are unchanged
    watch = CompileWatch(True, warmup_steps=1)
    ids = torch.tensor([[1, 5, 9, 3, 7]])
    torch.testing.assert_close(lm(input_ids=ids).logits, ref(input_ids=ids).logits)
    watch.step(1)
    assert watch.graphs() > 0
    lm(input_ids=ids)
    watch.step(2)
    assert watch.recompiles() == 0
    assert "Recompiling" not in capfd.readouterr().err
    try:
        lm(input_ids=torch.tensor([[1, 5, 9, 3, 7, 2, 2, 4, 4, 1, 1]]))  # another length
        assert watch.recompiles() > 0
        assert "Recompiling" in capfd.readouterr().err  # torch's log, on after the warm-up, says why
    finally:
        torch._logging.set_logs()


def test_every_stage_has_the_flags():
    from Stage0.train_vision_encoder_stage0 import parse_args as p0
    from Stage1.train_projection_stage1 import parse_args as p1
    from Stage2.train_vqa_stage2 import parse_args as p2
    base = {p0: ["--train_json", "x", "--image_root", "y", "--output_dir", "z"],
            p1: ["--train_json", "x", "--image_root", "y", "--output_dir", "z"],
            p2: ["--train_json", "x", "--image_root", "y", "--output_dir", "z"]}
    for parse, argv in base.items():
        a = parse(argv + ["--attn_implementation", "eager", "--gradient_checkpointing", "--torch_compile"])
        assert (a.attn_implementation, a.gradient_checkpointing, a.torch_compile) == ("eager", True, True)
        a = parse(argv + ["--no_gradient_checkpointing"])
        assert (a.attn_implementation, a.gradient_checkpointing, a.torch_compile) == ("sdpa", False, False)
    assert add_common_args(argparse.ArgumentParser()).parse_args(["--output_dir", "o"]).attn_implementation == "sdpa"
