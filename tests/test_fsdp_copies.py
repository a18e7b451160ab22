"""training/fsdp.py's export copies: meta_copy makes the shape of a model without copying its
weights, plain_copy fills it with a gathered state dict. Exports under FSDP write this copy,
so what it drops (a tie, a buffer no state dict holds, a parameter held outside the module's
own tree) would be missing from every FSDP export."""
import pytest
import torch
from torch import nn

from training.fsdp import meta_copy, plain_copy


class Tied(nn.Module):
    """An embedding tied to an LM head, a non-persistent buffer (rotary frequencies) and a
    persistent one (BatchNorm statistics), and a parameter also held by an outside module."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight
        self.norm = nn.BatchNorm1d(4)
        self.register_buffer("inv_freq", torch.arange(4.0), persistent=False)
        self.scale = nn.Parameter(torch.ones(1))
        self.outside = [nn.Module()]  # as ContrastiveModel's SiglipModel: not a registered submodule
        self.outside[0].scale = self.scale
        self.outside[0].embed = self.embed


def test_meta_copy_copies_no_weight_and_keeps_what_trains():
    live = Tied()
    live.norm.requires_grad_(False)
    shape = meta_copy(live)
    assert all(t.is_meta for t in [*shape.parameters(), *shape.buffers()])
    assert shape.head.weight is shape.embed.weight and shape.outside[0].scale is shape.scale
    assert [p.requires_grad for p in shape.parameters()] == [p.requires_grad for p in live.parameters()]
    assert not any(t.is_meta for t in [*live.parameters(), *live.buffers()])  # the live model is untouched


def test_plain_copy_holds_the_gathered_weights_ties_and_buffers():
    torch.manual_seed(0)
    live = Tied()
    shape = meta_copy(live)
    live.inv_freq.mul_(3)  # set after the shape was taken: the copy reads the live buffer
    full = {k: v.clone() + 1 for k, v in live.state_dict().items()}  # what the gather returns
    plain = plain_copy(shape, full, live, also=lambda m: m.outside)
    assert plain.head.weight is plain.embed.weight, "the tie was lost"
    assert plain.outside[0].scale is plain.scale and plain.outside[0].embed is plain.embed
    assert torch.equal(plain.scale, full["scale"]) and torch.equal(plain.outside[0].scale, full["scale"])
    assert torch.equal(plain.embed.weight, full["embed.weight"])
    assert torch.equal(plain.norm.running_mean, full["norm.running_mean"])
    assert torch.equal(plain.inv_freq, live.inv_freq) and plain.inv_freq.data_ptr() != live.inv_freq.data_ptr()
    assert not any(t.is_meta for t in [*plain.parameters(), *plain.buffers()])
    assert all(t.is_meta for t in shape.parameters()), "the shape is reused by every export"


def test_plain_copy_refuses_a_state_dict_that_leaves_a_tensor_unfilled():
    live = Tied()
    full = dict(live.state_dict())
    del full["norm.weight"]
    with pytest.raises(RuntimeError, match="norm.weight"):
        plain_copy(meta_copy(live), full, live)
