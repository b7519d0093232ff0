"""The small feature networks difflab trains itself, and their (deterministic) training loop.

Inception-v3 features mean little on 28x28 digits or 8x8 images, and its weights are not
always at hand; so each small dataset gets a small network trained on that dataset, whose
penultimate layer plays the role of Inception's pool3 (Heusel et al. 2017 use pool3 for FID;
any fixed embedding works, the numbers are only comparable within one extractor).

- :class:`ConvNet`: a LeNet-style CNN (LeCun et al. 1998) with strided convolutions and batch
  norm, trained as a classifier; features are its last hidden layer (after ReLU).
- :class:`MLPNet`: the same for tiny images (8x8 digits), fully connected.
- :class:`ConvAutoencoder`: for unlabelled sets (emoji); features are its bottleneck.

Training is deterministic given ``seed``: weights are initialised, batches drawn and shifts
sampled from one :class:`torch.Generator`; nothing reads the global RNG.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from difflab.errors import bad_value


class FeatureNet(nn.Module):
    """Interface of the feature networks: ``features(x) -> (N, D)``, ``logits(x) -> (N, C)``."""

    dim: int
    num_classes: int | None = None

    def features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def loss(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """Training loss of a batch (cross-entropy or reconstruction error)."""
        raise NotImplementedError

    def score(self, x: torch.Tensor, y: torch.Tensor | None) -> float:
        """Held-out quality: accuracy (classifiers) or PSNR in dB on [-1, 1] (autoencoders)."""
        raise NotImplementedError


class _Classifier(FeatureNet):
    head: nn.Linear

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def loss(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        return F.cross_entropy(self.logits(x), y)

    @torch.no_grad()
    def score(self, x: torch.Tensor, y: torch.Tensor | None) -> float:
        pred = torch.cat([self.logits(b).argmax(1) for b in x.split(1024)])
        return float((pred == y).double().mean())


class ConvNet(_Classifier):
    """LeNet-style CNN: conv5x5/2 -> BN -> ReLU -> conv3x3/2 -> BN -> ReLU -> FC(dim) -> ReLU
    (features) -> FC(classes) (logits)."""

    def __init__(self, channels: int, image_size: int, num_classes: int, width: int = 32,
                 dim: int = 128) -> None:
        super().__init__()
        self.dim, self.num_classes = dim, num_classes
        s = math.ceil(math.ceil(image_size / 2) / 2)
        self.body = nn.Sequential(
            nn.Conv2d(channels, width, 5, stride=2, padding=2), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.BatchNorm2d(2 * width),
            nn.ReLU(), nn.Flatten(), nn.Linear(2 * width * s * s, dim), nn.ReLU())
        self.head = nn.Linear(dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)  # (N, dim)


class MLPNet(_Classifier):
    """MLP for tiny images: flatten -> FC(hidden) -> ReLU -> FC(dim) -> ReLU (features) ->
    FC(classes)."""

    def __init__(self, channels: int, image_size: int, num_classes: int, hidden: int = 256,
                 dim: int = 64) -> None:
        super().__init__()
        self.dim, self.num_classes = dim, num_classes
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(channels * image_size ** 2, hidden),
                                  nn.ReLU(), nn.Linear(hidden, dim), nn.ReLU())
        self.head = nn.Linear(dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)  # (N, dim)


class ConvAutoencoder(FeatureNet):
    """Convolutional autoencoder (three stride-2 convs, a linear bottleneck of ``dim``, the
    mirror image back); features are the bottleneck. No classes, so no logits."""

    def __init__(self, channels: int, image_size: int, width: int = 32, dim: int = 64) -> None:
        super().__init__()
        if image_size % 8:
            raise bad_value("image_size", image_size, "a multiple of 8 (three stride-2 convs)")
        self.dim, self.s = dim, image_size // 8
        w = width
        flat = 2 * w * self.s ** 2
        self.encoder = nn.Sequential(
            nn.Conv2d(channels, w, 4, 2, 1), nn.ReLU(), nn.Conv2d(w, 2 * w, 4, 2, 1), nn.ReLU(),
            nn.Conv2d(2 * w, 2 * w, 4, 2, 1), nn.ReLU(), nn.Flatten(), nn.Linear(flat, dim))
        self.decoder = nn.Sequential(
            nn.Linear(dim, flat), nn.ReLU(), nn.Unflatten(1, (2 * w, self.s, self.s)),
            nn.ConvTranspose2d(2 * w, 2 * w, 4, 2, 1), nn.ReLU(),
            nn.ConvTranspose2d(2 * w, w, 4, 2, 1), nn.ReLU(),
            nn.ConvTranspose2d(w, channels, 4, 2, 1), nn.Tanh())

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)  # (N, dim)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("an autoencoder extractor has no class logits (no IS)")

    def loss(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        return F.mse_loss(self.decoder(self.encoder(x)), x)

    @torch.no_grad()
    def score(self, x: torch.Tensor, y: torch.Tensor | None) -> float:
        mse = torch.stack([F.mse_loss(self.decoder(self.encoder(b)), b, reduction="sum")
                           for b in x.split(512)]).sum() / x.numel()
        return float(10 * torch.log10(4.0 / mse))  # peak-to-peak range 2 -> peak^2 = 4


def init_weights(net: nn.Module, generator: torch.Generator) -> None:
    """Re-initialise every conv / linear layer from ``generator`` (PyTorch's default scheme:
    Kaiming-uniform weights with ``a = sqrt(5)``, uniform biases in ``+-1/sqrt(fan_in)``)."""
    for m in net.modules():
        if isinstance(m, nn.Conv2d | nn.ConvTranspose2d | nn.Linear):
            nn.init.kaiming_uniform_(m.weight, a=math.sqrt(5), generator=generator)
            if m.bias is not None:
                fan_in = nn.init._calculate_fan_in_and_fan_out(m.weight)[0]
                bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0.0
                nn.init.uniform_(m.bias, -bound, bound, generator=generator)


def random_shift(x: torch.Tensor, pixels: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by its own integer offset in ``[-pixels, pixels]^2`` (background
    -1 shifted in): the classic MNIST augmentation, drawn from ``generator``."""
    if pixels <= 0:
        return x
    n, s = x.shape[0], x.shape[-1]
    p = F.pad(x, (pixels,) * 4, value=-1.0)
    dy, dx = torch.randint(0, 2 * pixels + 1, (2, n), generator=generator)
    ar = torch.arange(s)
    rows = (dy[:, None] + ar)[:, None, :, None].expand(n, x.shape[1], s, s + 2 * pixels)
    p = p.gather(2, rows)
    cols = (dx[:, None] + ar)[:, None, None, :].expand(n, x.shape[1], s, s)
    return p.gather(3, cols)


@dataclass
class TrainConfig:
    """How a feature network is trained (Adam with a one-cycle learning rate)."""

    epochs: int = 5
    batch_size: int = 128
    lr: float = 5e-3
    shift: int = 2
    seed: int = 0


def train_net(net: FeatureNet, x: torch.Tensor, y: torch.Tensor | None, cfg: TrainConfig,
              progress: bool = False) -> float:
    """Train ``net`` in place on ``x`` (and labels ``y``); returns the wall time in seconds.

    Deterministic given ``cfg.seed``: one generator initialises the weights, shuffles every
    epoch and draws the shifts. The net is left in eval mode.
    """
    g = torch.Generator().manual_seed(cfg.seed)
    init_weights(net, g)
    opt = torch.optim.Adam(net.parameters(), cfg.lr)
    per_epoch = math.ceil(x.shape[0] / cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, total_steps=cfg.epochs * per_epoch)
    start = time.perf_counter()
    net.train()
    bar = tqdm(total=cfg.epochs * per_epoch, desc="training extractor", disable=not progress,
               unit="batch")
    for _ in range(cfg.epochs):
        perm = torch.randperm(x.shape[0], generator=g)
        for i in range(0, x.shape[0], cfg.batch_size):
            idx = perm[i: i + cfg.batch_size]
            if idx.numel() < 2:  # batch norm needs two samples
                continue
            xb = random_shift(x[idx], cfg.shift, g)
            loss = net.loss(xb, None if y is None else y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
    bar.close()
    net.eval()
    return time.perf_counter() - start
