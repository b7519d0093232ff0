"""The control-branch contract (ControlNet, Zhang et al. 2023, sec. 3.2), shown by a small test
branch: it runs at every denoiser call from ``(x_t, t, hint, cond)``, its residuals reach the
base network's skips and middle block, and it works under samplers and classifier-free
guidance, where it applies to both halves."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from difflab import VP, Cond, Control, Denoiser
from difflab.guidance import cfg
from difflab.networks import UNet, UNetConfig
from difflab.samplers import sample
from difflab.samplers.timesteps import discrete


class ToyControl(nn.Module):
    """Residual i = zero_conv_i(pool(concat(x, hint))) at skip i's size and width."""

    def __init__(self, base: UNet, hint_channels: int) -> None:
        super().__init__()
        c = base.config
        widths = [*base.skip_channels, base.trunk_channels]
        self.zero = nn.ModuleList(nn.Conv2d(c.in_channels + hint_channels, w, 1) for w in widths)
        for conv in self.zero:
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)
        sizes, size = [c.image_size], c.image_size
        for block in base.down:  # a downsampling block halves the size
            size = size // 2 if _downsamples(block) else size
            sizes.append(size)
        self.sizes = [*sizes, base.trunk_size]
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, x, t, hint, cond):
        self.calls.append((x.detach().clone(), t.detach().clone()))
        assert cond.control is None  # the branch sees the rest of the condition only
        h = torch.cat([x, hint], dim=1)
        return [conv(F.adaptive_avg_pool2d(h, s)) for conv, s in zip(self.zero, self.sizes)]


def _downsamples(block) -> bool:
    from difflab.networks.layers import Downsample, ResBlock

    b = block[0]
    return isinstance(b, Downsample) or (isinstance(b, ResBlock) and b.resample is not None)


@pytest.fixture
def setup():
    torch.manual_seed(0)
    base = UNet(UNetConfig.preset("tiny", model_channels=8, num_heads=2, num_classes=3,
                                  in_channels=1, out_channels=1))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in base.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    path = VP.discrete_linear(50)
    return base, Denoiser(base, path), path


def test_zero_initialised_control_is_the_base_model_bit_for_bit(setup):
    base, den, path = setup
    branch = ToyControl(base, 2)
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([0.3, 0.7])
    labels = torch.tensor([0, 2])
    plain = den.bind(Cond(labels=labels))(x, t)
    hint = torch.randn(2, 2, 16, 16)
    ctl = den.bind(Cond(labels=labels, control=[Control(branch, hint)]))(x, t)
    assert torch.equal(plain.x0, ctl.x0)
    # gradients reach the zero convolutions; the base can stay frozen
    base.requires_grad_(False)
    ctl = den.bind(Cond(labels=labels, control=[Control(branch, hint)]))(x, t)
    ctl.eps.square().sum().backward()
    assert all(c.weight.grad is not None and c.weight.grad.abs().sum() > 0 for c in branch.zero)
    assert all(p.grad is None for p in base.parameters())


def test_the_branch_runs_at_every_call_on_the_current_x_t_and_scales_add(setup):
    base, den, path = setup
    branch = ToyControl(base, 2)
    with torch.no_grad():
        for conv in branch.zero:
            conv.weight.normal_(0, 0.3)
    hint = torch.randn(2, 2, 16, 16)
    grid = discrete(path, 5)
    x = torch.randn(2, 1, 16, 16)
    a = sample("ddim", den.bind(Cond(control=[Control(branch, hint, 1.0)])), x, grid)
    assert len(branch.calls) == 5  # one per network evaluation of DDIM's 5 steps
    seen = [c[0] for c in branch.calls]
    assert torch.equal(seen[0], x) and not torch.equal(seen[1], x)  # x_t, not a bound value
    base_out = sample("ddim", den, x, grid)
    assert not torch.allclose(a, base_out)
    # two controls of scale 0.5 with the same branch equal one of scale 1
    half = [Control(branch, hint, 0.5), Control(branch, hint, 0.5)]
    b = sample("ddim", den.bind(Cond(control=half)), x, grid)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    zero = sample("ddim", den.bind(Cond(control=[Control(branch, hint, 0.0)])), x, grid)
    torch.testing.assert_close(zero, base_out, atol=1e-6, rtol=0)


def test_classifier_free_guidance_applies_the_control_to_both_halves(setup):
    base, den, path = setup
    branch = ToyControl(base, 2)
    with torch.no_grad():
        for conv in branch.zero:
            conv.weight.normal_(0, 0.3)
    hint = torch.randn(2, 2, 16, 16)
    cond = Cond(labels=torch.tensor([0, 1]), control=[Control(branch, hint)])
    null = Cond(labels=torch.tensor([3, 3]))
    g = cfg(den, cond, null, 2.0)
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([0.5, 0.5])
    branch.calls.clear()
    out = g(x, t)
    assert len(branch.calls) == 1 and branch.calls[0][0].shape[0] == 4  # one batched call
    # the same as guiding by hand with the control in both halves
    c = den.bind(cond)(x, t)
    u = den.bind(Cond(labels=null.labels, control=cond.control))(x, t)
    torch.testing.assert_close(out.x0, u.x0 + 2.0 * (c.x0 - u.x0), atol=1e-5, rtol=1e-5)
    # batch slicing keeps per-sample hints
    part = cond[1:]
    assert part.control[0].hint.shape[0] == 1 and part.batch_size() == 1
