"""VQGAN's vector-quantised autoencoder (Esser et al. 2021, Sec. 3.1; van den Oord et al. 2017,
VQ-VAE) as LDM's VQ-regularised first stage (Rombach et al. 2022, Sec. 3 and App. G).

The encoder (that of :mod:`difflab.latent.autoencoder`, with ``c`` output channels) and a 1x1
``quant_conv`` give ``z_e`` of ``embed_dim`` channels; each position is replaced by its nearest
codebook vector ``z_q = e_k``, ``k = argmin_j ||z_e - e_j||`` (VQ-VAE eq. 1-2); gradients pass
to the encoder by the straight-through estimator ``z_e + sg[z_q - z_e]``. The loss (VQ-VAE eq.
3, VQGAN eq. 4) is ``||sg[z_e] - z_q||^2 + beta ||z_e - sg[z_q]||^2`` (the commitment term
with weight ``beta``; means over the latent). With ``ema = true`` the codebook term is replaced
by exponential-moving-average updates of the codebook (VQ-VAE App. A.1): per code, the count
``N_k`` and the sum ``m_k`` of the vectors assigned to it decay by ``ema_decay``, and
``e_k = m_k / N_k`` with Laplace smoothing of the counts.

Codebook collapse (most codes never chosen, so never updated) is countered by restarts of dead
codes (Jukebox's "random restarts for embeddings", Dhariwal et al. 2020; the replacement of
unused codes in SoundStream, Zeghidour et al. 2021): with ``restart_threshold > 0`` a moving
average of each code's count per batch is kept (the EMA codebook's ``N_k``; a ``usage`` buffer
otherwise), and a code whose average falls below the threshold is moved onto an encoder output
of the current batch. Where Jukebox draws that output at random, difflab picks them by the
farthest-point rule of greedy k-centre clustering (Gonzalez 1985): the output the codebook
quantises worst (largest ``||z_e - z_q||``), then the worst once that one is a code, and so on,
so that restarted codes spread over the badly served data instead of piling into one far
cluster. It needs no random state, so a resumed run restarts the same codes the same way, and
under data parallel every process gathers the same global batch and keeps the same codebook.

As LDM does, the *codec's* latent is ``z_e`` before quantisation: the diffusion model learns
``z_e``, and :meth:`VQModel.decode` quantises before decoding ("the quantisation layer is
absorbed by the decoder", LDM Sec. 3). Names follow diffusers' ``VQModel`` (``quantize.
embedding.weight``, ``quant_conv``, ``post_quant_conv``); tests/latent/test_vq.py checks
outputs against a tiny ``diffusers.VQModel`` with the same weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from difflab.components import Family, image_fields, register_family
from difflab.latent.autoencoder import AutoencoderKLConfig, Decoder, Encoder
from difflab.latent.codec import Codec, DiagonalGaussian

__all__ = ["VQModel", "VQModelConfig", "VectorQuantizer", "VQOutput"]


@dataclass(frozen=True)
class VQModelConfig:
    """Fields of :class:`VQModel` (the encoder / decoder fields as
    :class:`~difflab.latent.autoencoder.AutoencoderKLConfig`).

    Attributes:
        num_embeddings: codebook size ``K``.
        embed_dim: codebook vector width (None: ``latent_channels``).
        beta: the commitment weight (VQ-VAE: 0.25).
        ema: update the codebook by moving averages instead of its loss term.
        ema_decay: their decay (VQ-VAE: 0.99), also that of the usage average.
        restart_threshold: restart a code whose moving-average count of vectors per (global)
            batch falls below this (0: never; module docstring).
    """

    in_channels: int = 3
    image_size: int = 64
    block_channels: tuple[int, ...] = (32, 64, 64)
    layers_per_block: int = 1
    latent_channels: int = 3
    groups: int = 8
    mid_attention: bool = True
    out_channels: int | None = None
    num_embeddings: int = 256
    embed_dim: int | None = None
    beta: float = 0.25
    ema: bool = False
    ema_decay: float = 0.99
    restart_threshold: float = 0.0

    def __post_init__(self) -> None:
        self.backbone()  # the encoder / decoder checks
        if self.num_embeddings < 2:
            raise ValueError(f"num_embeddings={self.num_embeddings}: expected at least 2 codes")
        if self.embed_dim is not None and self.embed_dim < 1:
            raise ValueError(f"embed_dim={self.embed_dim}: expected at least 1")
        if not self.beta >= 0:
            raise ValueError(f"beta={self.beta}: expected a weight >= 0")
        if not 0 < self.ema_decay < 1:
            raise ValueError(f"ema_decay={self.ema_decay}: expected a decay in (0, 1)")
        if not self.restart_threshold >= 0:
            raise ValueError(f"restart_threshold={self.restart_threshold}: expected a count "
                             ">= 0 (0 turns restarts off)")

    def backbone(self) -> AutoencoderKLConfig:
        return AutoencoderKLConfig(self.in_channels, self.image_size, tuple(self.block_channels),
                                   self.layers_per_block, self.latent_channels, self.groups,
                                   self.mid_attention, self.out_channels)

    @property
    def factor(self) -> int:
        return 2 ** (len(self.block_channels) - 1)

    @property
    def dim(self) -> int:
        return self.embed_dim or self.latent_channels


PRESETS = {
    "small": VQModelConfig(),  # f = 4, 256 codes of 3 channels (configs/vq_emoji.toml)
    "tiny": VQModelConfig(block_channels=(8, 16, 16), groups=4, image_size=16,
                          num_embeddings=16),
}


@dataclass
class VQOutput:
    """What quantising a batch gives: ``z_q`` (straight-through), the per-example VQ loss
    ``(B,)``, the code indices ``(B, h, w)``."""

    z_q: Tensor
    loss: Tensor
    indices: Tensor


class VectorQuantizer(nn.Module):
    """Nearest-neighbour quantisation onto ``embedding.weight`` ``(K, D)`` (module docstring)."""

    def __init__(self, num_embeddings: int, dim: int, beta: float = 0.25, ema: bool = False,
                 decay: float = 0.99, eps: float = 1e-5, restart_threshold: float = 0.0) -> None:
        super().__init__()
        self.K, self.D, self.beta = num_embeddings, dim, beta
        self.ema, self.decay, self.eps = ema, decay, eps
        self.restart_threshold = restart_threshold
        self.embedding = nn.Embedding(num_embeddings, dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / num_embeddings, 1.0 / num_embeddings)
        if ema:
            self.embedding.weight.requires_grad_(False)
            self.register_buffer("cluster_size", torch.zeros(num_embeddings))
            self.register_buffer("embed_sum", self.embedding.weight.detach().clone())
        elif restart_threshold > 0:  # (the EMA codebook's cluster_size is its usage)
            self.register_buffer("usage", torch.zeros(num_embeddings))

    @torch.no_grad()
    def codes(self, z: Tensor) -> Tensor:
        """Indices ``(B, h, w)`` of the nearest codes of ``z`` ``(B, D, h, w)``."""
        flat = z.permute(0, 2, 3, 1).reshape(-1, self.D)
        e = self.embedding.weight
        # ||z||^2 - 2 z.e + ||e||^2 (the first term does not change the argmin)
        d = (e * e).sum(1)[None, :] - 2.0 * flat @ e.t()
        return d.argmin(1).reshape(z.shape[0], *z.shape[2:])

    def lookup(self, indices: Tensor) -> Tensor:
        """Code vectors ``(B, D, h, w)`` of indices ``(B, h, w)``."""
        return self.embedding(indices).permute(0, 3, 1, 2)

    def forward(self, z: Tensor) -> VQOutput:
        idx = self.codes(z)
        q = self.lookup(idx)
        commit = (z - q.detach()).pow(2).flatten(1).mean(1)
        updating = self.training and torch.is_grad_enabled()
        if self.ema:
            if updating:  # (this batch used the old codes)
                q = q.detach().clone()
                self._ema_update(z.detach(), idx)
            loss = self.beta * commit
        else:
            loss = (z.detach() - q).pow(2).flatten(1).mean(1) + self.beta * commit
        z_q = z + (q - z).detach()  # straight-through
        if updating and self.restart_threshold > 0:
            self._restart_dead_codes(z.detach(), q.detach(), idx)
        return VQOutput(z_q, loss, idx)

    @staticmethod
    def _data_parallel() -> bool:
        return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1

    @torch.no_grad()
    def _ema_update(self, z: Tensor, idx: Tensor) -> None:
        flat = z.permute(0, 2, 3, 1).reshape(-1, self.D)
        onehot = F.one_hot(idx.reshape(-1), self.K).to(flat.dtype)
        counts, sums = onehot.sum(0), onehot.t() @ flat
        if self._data_parallel():
            # Data-parallel training: every process adds the statistics of the whole global
            # batch, so the codebooks stay identical and equal one process's on that batch
            # (without this, DDP's buffer broadcast keeps only the first process's update).
            dist.all_reduce(counts)
            dist.all_reduce(sums)
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.embed_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        n = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (n + self.K * self.eps) * n
        self.embedding.weight.copy_(self.embed_sum / smoothed[:, None])

    @torch.no_grad()
    def _restart_dead_codes(self, z: Tensor, q: Tensor, idx: Tensor) -> None:
        """Move the codes whose average usage is below the threshold onto encoder outputs of
        the batch picked as farthest points (module docstring); ``q`` is the batch's
        quantisation."""
        if self.ema:
            usage = self.cluster_size  # already updated with this batch, summed over processes
        else:
            counts = torch.bincount(idx.reshape(-1), minlength=self.K).to(self.usage.dtype)
            if self._data_parallel():
                dist.all_reduce(counts)
            usage = self.usage.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        dead = (usage < self.restart_threshold).nonzero().flatten()
        if dead.numel() == 0:
            return
        flat = z.permute(0, 2, 3, 1).reshape(-1, self.D)
        err = (flat - q.permute(0, 2, 3, 1).reshape(-1, self.D)).pow(2).sum(1)
        if self._data_parallel():  # every process picks from the same global batch
            world = dist.get_world_size()
            flats = [torch.empty_like(flat) for _ in range(world)]
            errs = [torch.empty_like(err) for _ in range(world)]
            dist.all_gather(flats, flat.contiguous())
            dist.all_gather(errs, err.contiguous())
            flat, err = torch.cat(flats), torch.cat(errs)
        picks = []
        for _ in range(dead.numel()):  # greedy farthest points: the worst quantised vector,
            i = int(err.argmax())      # then the worst once it is a code, and so on
            if not err[i] > 0:
                break  # every vector of the batch is already a code
            picks.append(i)
            err = torch.minimum(err, (flat - flat[i]).pow(2).sum(1))
        if not picks:
            return
        m = len(picks)
        cand = flat[torch.tensor(picks, device=flat.device)]
        codes = dead[:m]
        self.embedding.weight[codes] = cand.to(self.embedding.weight.dtype)
        usage[codes] = self.restart_threshold
        if self.ema:
            self.embed_sum[codes] = cand * self.restart_threshold


class VQModel(Codec):
    """VQGAN / LDM's VQ first stage (module docstring). ``encode`` gives ``z_e`` (a point
    posterior), ``decode`` quantises and decodes, ``forward`` returns the reconstruction and
    the :class:`VQOutput`."""

    def __init__(self, config: VQModelConfig | None = None) -> None:
        super().__init__()
        c = self.config = config or VQModelConfig()
        b = c.backbone()
        self.factor = c.factor
        self.latent_channels = c.dim
        self.image_channels = c.in_channels
        self.encoder = Encoder(b, double_z=False)
        self.quant_conv = nn.Conv2d(c.latent_channels, c.dim, 1)
        self.quantize = VectorQuantizer(c.num_embeddings, c.dim, c.beta, c.ema, c.ema_decay,
                                        restart_threshold=c.restart_threshold)
        self.post_quant_conv = nn.Conv2d(c.dim, c.latent_channels, 1)
        self.decoder = Decoder(b)

    def _check(self, x: Tensor, channels: int, what: str) -> None:
        if x.ndim != 4 or x.shape[1] != channels:
            raise ValueError(f"{what}: expected (B, {channels}, H, W), got {tuple(x.shape)}")

    def encode_unquantized(self, x: Tensor) -> Tensor:
        self._check(x, self.image_channels, "VQModel.encode")
        if x.shape[-1] % self.factor or x.shape[-2] % self.factor:
            raise ValueError(f"VQModel.encode: image sides {tuple(x.shape[-2:])} must be "
                             f"multiples of the factor {self.factor}")
        return self.quant_conv(self.encoder(x))

    def encode(self, x: Tensor) -> DiagonalGaussian:
        return DiagonalGaussian(self.encode_unquantized(x))

    def decode_quantized(self, z_q: Tensor) -> Tensor:
        return self.decoder(self.post_quant_conv(z_q))

    def decode(self, z: Tensor) -> Tensor:
        self._check(z, self.latent_channels, "VQModel.decode")
        return self.decode_quantized(self.quantize.lookup(self.quantize.codes(z)))

    def forward(self, x: Tensor, generator: torch.Generator | None = None,
                sample: bool = True) -> tuple[Tensor, VQOutput]:
        out = self.quantize(self.encode_unquantized(x))
        return self.decode_quantized(out.z_q), out

    @property
    def last_layer(self) -> Tensor:
        return self.decoder.conv_out.weight

    @torch.no_grad()
    def codebook_usage(self, images: Tensor, batch_size: int = 64) -> dict:
        """On ``images``: the fraction of the ``K`` codes used, and the perplexity
        ``exp(H(p))`` of the code frequencies (``K`` when all are used equally)."""
        counts = torch.zeros(self.quantize.K, dtype=torch.float64)
        for b in images.split(batch_size):
            idx = self.quantize.codes(self.encode_unquantized(b.to(self.last_layer.device)))
            counts += torch.bincount(idx.reshape(-1).cpu(), minlength=self.quantize.K).double()
        p = counts / counts.sum()
        nz = p[p > 0]
        return {"codes": self.quantize.K, "used": int((counts > 0).sum()),
                "used_fraction": float((counts > 0).double().mean()),
                "perplexity": float(torch.exp(-(nz * nz.log()).sum()))}


def _shape(c: VQModelConfig) -> tuple[int, ...]:
    return (c.in_channels, c.image_size, c.image_size)


FAMILY = register_family(Family(
    name="vq", config=VQModelConfig, build=VQModel, kind="codec", presets=PRESETS,
    default_preset="small", resolve=image_fields, input_shape=_shape,
    doc="VQGAN's vector-quantised autoencoder (LDM's VQ first stage; diffusers' VQModel layout)"))
