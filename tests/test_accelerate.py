"""sr3fast.accelerate on a foreign SR3 U-Net (tests/peer_sr3.py, written like the public code)."""
import copy

import pytest
import torch
from torch import nn

import sr3fast
from peer_sr3 import FeatureWiseAffine, UNet
from support import assert_within_baseline

TINY = dict(inner_channel=16, channel_mults=(1, 2), attn_res=(8,), res_blocks=1, norm_groups=4,
            image_size=16)


def _peer(seed=0, **overrides):
    torch.manual_seed(seed)
    net = UNet(**{**TINY, **overrides}).eval()
    # default init leaves GroupNorm at identity and small outputs; randomise so every path matters
    with torch.no_grad():
        for parameter in net.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    return net


def _inputs(batch=2, size=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 6, size, size, generator=g)
    level = torch.rand(batch, 1, generator=g) * 0.9 + 0.05       # sqrt(gamma), as the public code passes
    return x, level


def test_keys_parameters_and_outputs_are_kept():
    net = _peer()
    reference = copy.deepcopy(net).double()
    baseline = copy.deepcopy(net)
    keys = {k: v.shape for k, v in net.state_dict().items()}
    params = {name: id(p) for name, p in net.named_parameters()}

    report = sr3fast.accelerate(net)
    print(report)

    assert {k: v.shape for k, v in net.state_dict().items()} == keys
    assert {name: id(p) for name, p in net.named_parameters()} == params
    kinds = [kind for _, kind in report.replaced]
    # tiny: 2 down + 2 mid + 4 up residual blocks; attention at 8x8: 1 down + 1 mid + 2 up
    assert kinds.count("residual block") == 8
    assert kinds.count("self-attention") == 4
    # block1 of each residual block + final_conv; block2's pair is fused with its shift instead
    assert kinds.count("groupnorm+silu") == 9
    assert kinds.count("conv2d") == sum(type(m) is nn.Conv2d for m in baseline.modules())
    assert report.left_alone == []

    x, level = _inputs()
    with torch.no_grad():
        expected = reference(x.double(), level.double())
        assert_within_baseline("accelerated peer", net(x, level), expected, baseline(x, level), atol=1e-6)


def test_gradients_match_the_foreign_module():
    net, original = _peer(seed=3), _peer(seed=3)
    sr3fast.accelerate(net)
    x, level = _inputs(seed=4)
    net(x, level).square().mean().backward()
    original(x, level).square().mean().backward()
    for (name, p), q in zip(net.named_parameters(), original.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_accelerating_twice_changes_nothing_more():
    net = _peer()
    sr3fast.accelerate(net)
    again = sr3fast.accelerate(net)
    assert again.replaced == []


def test_look_alikes_with_other_semantics_are_left_alone():
    class NotReallyAttention(nn.Module):
        """norm/qkv/out like SR3's attention, but no softmax and no residual."""

        def __init__(self, channels):
            super().__init__()
            self.n_head = 1
            self.norm = nn.GroupNorm(4, channels)
            self.qkv = nn.Conv2d(channels, 3 * channels, 1, bias=False)
            self.out = nn.Conv2d(channels, channels, 1)

        def forward(self, x):
            q, k, v = self.qkv(self.norm(x)).chunk(3, dim=1)
            return self.out(q * k + v)

    torch.manual_seed(0)
    module = nn.Sequential(NotReallyAttention(8))
    x = torch.randn(2, 8, 4, 4)
    before = module(x)
    report = sr3fast.accelerate(module)
    assert [kind for _, kind in report.replaced] == ["conv2d", "conv2d"]  # its convolutions only
    assert any("computes something else" in why for _, why in report.left_alone)
    torch.testing.assert_close(module(x), before, rtol=0, atol=0)


def test_affine_noise_conditioning_is_not_fused_as_a_shift():
    net = _peer()
    for module in net.modules():
        if isinstance(module, FeatureWiseAffine):
            module.use_affine_level = True      # FiLM: (1 + gamma) x + beta is not an additive shift
    report = sr3fast.accelerate(net)
    assert not any(kind == "residual block" for _, kind in report.replaced)


def test_a_module_without_parameters_is_reported():
    report = sr3fast.accelerate(nn.ReLU())
    assert report.replaced == [] and "no parameters" in str(report)


@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_reduced_precision_module(dtype):
    net = _peer()
    reference = copy.deepcopy(net).double()
    baseline = copy.deepcopy(net).to(dtype)
    net = net.to(dtype)
    sr3fast.accelerate(net)
    x, level = _inputs()
    with torch.no_grad():
        expected = reference(x.double(), level.double())
        assert_within_baseline(f"accelerated peer {dtype}", net(x.to(dtype), level.to(dtype)),
                               expected, baseline(x.to(dtype), level.to(dtype)), atol=1e-2)
