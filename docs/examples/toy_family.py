"""A toy component family in one file: a per-pixel MLP denoiser (see docs/add_a_family.md).

It is deliberately small: what matters is the four things every family gives the registry
(a config dataclass, a build function, a kind, and the fields the data decides), after which
training, checkpoints, ``difflab.save`` / ``load``, every sampler and guidance all work
without any other file knowing about it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from difflab.components import DataSpec, Family, image_shape, register_family
from difflab.errors import bad_value


@dataclass
class ToyMLPConfig:
    """The family's only schema: its fields, defaults and validation.

    Attributes:
        image_size, in_channels: filled from the data by ``resolve`` below.
        hidden: width of the per-pixel MLP.
        time_features: sinusoidal features of the time input.
    """

    image_size: int = 8
    in_channels: int = 1
    hidden: int = 64
    time_features: int = 16

    def __post_init__(self) -> None:
        if self.hidden < 1:
            raise bad_value("hidden", self.hidden, "an int >= 1")
        if self.time_features < 2 or self.time_features % 2:
            raise bad_value("time_features", self.time_features, "an even int >= 2")


class ToyMLP(nn.Module):
    """``net(x, t, cond) -> prediction`` of ``x``'s shape: each pixel's channels and the
    time features go through a two-layer MLP (1x1 convolutions)."""

    def __init__(self, config: ToyMLPConfig) -> None:
        super().__init__()
        self.config = config
        c, h = config.in_channels, config.hidden
        self.net = nn.Sequential(nn.Conv2d(c + config.time_features, h, 1), nn.SiLU(),
                                 nn.Conv2d(h, h, 1), nn.SiLU(), nn.Conv2d(h, c, 1))

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
        half = self.config.time_features // 2
        freqs = torch.exp(-math.log(1000.0) * torch.arange(half, device=x.device) / half)
        angles = t.reshape(-1, 1).float() * freqs
        emb = torch.cat([angles.sin(), angles.cos()], dim=1).to(x.dtype)
        emb = emb.expand(x.shape[0], -1)[:, :, None, None].expand(-1, -1, *x.shape[2:])
        return self.net(torch.cat([x, emb], dim=1))


def _from_data(data: DataSpec) -> dict:
    """The fields the data decides (a TOML section never repeats them)."""
    return {k: v for k, v in (("image_size", data.image_size), ("in_channels", data.channels))
            if v is not None}


FAMILY = register_family(Family(
    name="toy_mlp", config=ToyMLPConfig, build=ToyMLP, kind="denoiser",
    presets={"small": ToyMLPConfig(hidden=64), "tiny": ToyMLPConfig(hidden=16)},
    default_preset="small", resolve=_from_data, input_shape=image_shape,
    doc="a per-pixel MLP denoiser (the docs' toy family)"))
