"""Attention for the diffusion U-Nets, behind a replaceable attention processor.

Every attention layer is an :class:`Attention` module whose whole computation is done by
``self.processor``, called with the module and the hidden states *before* the q/k/v
projections (the contract of :class:`AttentionProcessor`). The default
:class:`SDPAProcessor` projects, calls ``torch.nn.functional.scaled_dot_product_attention``
(Vaswani et al. 2017, eq. 1: ``softmax(q k^T / sqrt(d)) v``) and projects out;
:class:`ProbabilityProcessor` forms the probabilities explicitly so that they can be read or
replaced. Swapping the processor (:func:`set_attn_processor`) is how LoRA, hypernetworks,
prompt-to-prompt and attention visualisation hook every attention in a model without touching
the network code.

Two wrappers over feature maps of any dimension use it: :class:`AttentionBlock` (ADM's
self-attention over the pixels, Dhariwal & Nichol 2021 sec. 3) and :class:`SpatialTransformer`
(LDM's transformer with cross-attention to a context, Rombach et al. 2022 sec. 3.3).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Protocol

import torch.nn.functional as F
from torch import Tensor, nn

from difflab.errors import DifflabError
from difflab.networks.layers import ContextBlock, group_norm

__all__ = [
    "Attention",
    "AttentionBlock",
    "AttentionProcessor",
    "FeedForward",
    "ProbabilityProcessor",
    "SDPAProcessor",
    "SpatialTransformer",
    "TransformerBlock",
    "attention_modules",
    "set_attn_processor",
]


class AttentionProcessor(Protocol):
    """What an attention processor is: ``processor(attn, x, context, context_mask) -> out``.

    The processor receives the calling :class:`Attention` module and its hidden states
    *before* the q/k/v projections (as diffusers' ``AttnProcessor``): ``x (B, N, dim)``, the
    cross-attention ``context (B, L, context_dim)`` (None for self-attention) and
    ``context_mask (B, L)`` (True = real token, or None). It returns ``(B, N, dim)``, after the
    output projection. It composes the module's steps, each of which it may wrap or replace:

    - :meth:`Attention.project` -> ``q (B, h, N, d)``, ``k, v (B, h, L, d)`` (LoRA,
      hypernetworks and IP-adapters wrap the projections ``to_qkv`` / ``to_q`` / ``to_kv``);
    - :meth:`Attention.key_mask` -> the boolean mask for the scores and the rows with no token;
    - :meth:`Attention.probabilities` -> ``softmax(q k^T / sqrt(d))`` ``(B, h, N, L)``, which
      prompt-to-prompt reads and replaces before multiplying by ``v``;
    - :meth:`Attention.output` -> heads merged and projected by ``to_out``.
    """

    def __call__(self, attn: Attention, x: Tensor, context: Tensor | None,
                 context_mask: Tensor | None) -> Tensor: ...


class SDPAProcessor:
    """The default processor: PyTorch's fused ``scaled_dot_product_attention``."""

    def __call__(self, attn: Attention, x: Tensor, context: Tensor | None = None,
                 context_mask: Tensor | None = None) -> Tensor:
        q, k, v = attn.project(x, context)  # (B, h, N, d), (B, h, L, d) x 2
        mask, empty = attn.key_mask(context_mask)
        return attn.output(F.scaled_dot_product_attention(q, k, v, attn_mask=mask), empty)

    def __repr__(self) -> str:
        return "SDPAProcessor()"


class ProbabilityProcessor:
    """Attention written out through its probabilities (Vaswani et al. 2017, eq. 1):
    ``softmax(q k^T / sqrt(d)) v``. Subclasses override :meth:`edit` to read or replace the
    probabilities ``(B, h, N, L)`` (prompt-to-prompt, attention maps); as is, it equals
    :class:`SDPAProcessor` up to rounding."""

    def edit(self, attn: Attention, probs: Tensor) -> Tensor:
        """The probabilities to use (default: unchanged)."""
        return probs

    def __call__(self, attn: Attention, x: Tensor, context: Tensor | None = None,
                 context_mask: Tensor | None = None) -> Tensor:
        q, k, v = attn.project(x, context)
        mask, empty = attn.key_mask(context_mask)
        probs = self.edit(attn, attn.probabilities(q, k, mask))  # (B, h, N, L)
        return attn.output(probs @ v, empty)


class Attention(nn.Module):
    """Multi-head attention over token sequences (Vaswani et al. 2017, sec. 3.2.2).

    Self-attention when ``context_dim`` is None (one fused q/k/v projection
    ``to_qkv``), cross-attention to a ``context (B, L, context_dim)`` otherwise
    (``to_q`` from the input, fused ``to_kv`` from the context). ``is_cross`` records which.
    The computation is the attention processor's (``self.processor``; see
    :class:`AttentionProcessor`), built from the steps below.

    Args:
        dim: width of the input tokens (and of the output).
        heads: number of heads.
        head_dim: width of each head.
        context_dim: width of the context tokens, or None for self-attention.
        qkv_bias: give the q/k/v projections a bias (ADM: yes; LDM: no).
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        head_dim: int,
        context_dim: int | None = None,
        qkv_bias: bool = False,
    ) -> None:
        super().__init__()
        inner = heads * head_dim
        self.heads, self.head_dim = heads, head_dim
        self.is_cross = context_dim is not None
        if context_dim is None:
            self.to_qkv = nn.Linear(dim, 3 * inner, bias=qkv_bias)
        else:
            self.to_q = nn.Linear(dim, inner, bias=qkv_bias)
            self.to_kv = nn.Linear(context_dim, 2 * inner, bias=qkv_bias)
        self.to_out = nn.Linear(inner, dim)
        self.processor: AttentionProcessor = SDPAProcessor()

    def forward(
        self, x: Tensor, context: Tensor | None = None, context_mask: Tensor | None = None
    ) -> Tensor:
        """Attend from ``x (B, N, dim)`` to itself or to ``context (B, L, context_dim)``.

        ``context_mask (B, L)`` is True for real tokens; masked tokens get zero weight.
        A sample without any real token attends to nothing (its attention output is zero).
        Returns ``(B, N, dim)``.
        """
        if self.is_cross and context is None:
            raise ValueError("cross-attention needs a context (B, L, context_dim)")
        return self.processor(self, x, context, context_mask)

    # ----- the steps a processor composes ----------------------------------------------------
    def split(self, h: Tensor) -> Tensor:
        """``(B, N, heads * head_dim) -> (B, heads, N, head_dim)``."""
        return h.unflatten(-1, (self.heads, self.head_dim)).transpose(1, 2)

    def project(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Queries from ``x``, keys and values from ``x`` (self) or ``context`` (cross), split
        into heads: ``q (B, h, N, d)``, ``k, v (B, h, L, d)``."""
        split = (self.heads, self.head_dim)
        if self.is_cross:
            q = self.split(self.to_q(x))  # (B, h, N, d)
            k, v = self.to_kv(context).unflatten(-1, (2, *split)).permute(2, 0, 3, 1, 4)
            return q, k, v
        q, k, v = self.to_qkv(x).unflatten(-1, (3, *split)).permute(2, 0, 3, 1, 4)
        return q, k, v

    @staticmethod
    def key_mask(context_mask: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
        """``(mask, empty)``: ``mask (B, 1, 1, L)`` True where a key may be attended to, and
        ``empty (B, 1, 1, 1)`` True for samples without any real token (their mask is opened,
        to avoid an all ``-inf`` softmax row, and their output zeroed by :meth:`output`)."""
        if context_mask is None:
            return None, None
        mask = context_mask[:, None, None, :]  # (B, 1, 1, L)
        has_token = context_mask.any(dim=-1)
        if bool(has_token.all()):
            return mask, None
        empty = ~has_token[:, None, None, None]
        return mask | empty, empty

    def probabilities(self, q: Tensor, k: Tensor, mask: Tensor | None = None) -> Tensor:
        """``softmax(q k^T / sqrt(d))`` ``(B, h, N, L)``, masked keys at zero (eq. 1)."""
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (B, h, N, L)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        return scores.softmax(dim=-1)

    def output(self, out: Tensor, empty: Tensor | None = None) -> Tensor:
        """Merge the heads of ``out (B, h, N, d)`` (zero for ``empty`` samples) and apply
        ``to_out``: ``(B, N, dim)``."""
        if empty is not None:
            out = out.masked_fill(empty, 0.0)
        return self.to_out(out.transpose(1, 2).flatten(2))  # (B, N, dim)


def _tokens(x: Tensor) -> Tensor:
    """``(B, C, *S) -> (B, prod(S), C)``; a free view for channels_last input."""
    return x.flatten(2).transpose(1, 2)


def _pixels(tokens: Tensor, size: tuple[int, ...]) -> Tensor:
    """``(B, prod(S), C) -> (B, C, *S)``; channels_last in memory, no copy."""
    return tokens.transpose(1, 2).unflatten(2, size)


class AttentionBlock(nn.Module):
    """ADM's self-attention over the pixels of a feature map, with a residual.

    ``x + proj_out(attention(GN(x)))`` where every pixel is a token (DDPM App. B;
    ADM sec. 3 uses several heads); over a sequence or a video every position is one.
    ``attn.to_out`` is zero-initialised by the model.

    Args:
        channels: feature channels (the token width).
        heads: number of heads.
        head_dim: width of each head (``heads * head_dim`` is usually ``channels``).
    """

    def __init__(self, channels: int, heads: int, head_dim: int) -> None:
        super().__init__()
        self.norm = group_norm(channels)
        self.attn = Attention(channels, heads, head_dim, qkv_bias=True)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C, *S) -> (B, C, *S)``."""
        out = self.attn(_tokens(self.norm(x)))  # (B, prod(S), C)
        return x + _pixels(out, x.shape[2:])


class FeedForward(nn.Module):
    """GEGLU feed-forward: ``W2 (x W a * GELU(x V))`` (Shazeer 2020, eq. 6; used by LDM).

    Args:
        dim: token width.
        mult: hidden width multiplier.
        dropout: dropout on the hidden activations.
    """

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        self.proj_in = nn.Linear(dim, 2 * mult * dim)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.proj_out = nn.Linear(mult * dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, N, dim) -> (B, N, dim)``."""
        a, gate = self.proj_in(x).chunk(2, dim=-1)
        return self.proj_out(self.dropout(a * F.gelu(gate)))


class TransformerBlock(nn.Module):
    """Pre-norm transformer block: self-attention, cross-attention, GEGLU (LDM sec. 3.3).

    Args:
        dim: token width.
        heads: number of heads.
        head_dim: width of each head.
        context_dim: width of the context, or None for no cross-attention.
        dropout: feed-forward dropout.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        head_dim: int,
        context_dim: int | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, head_dim)
        self.norm2: nn.Module | None = None
        self.attn2: Attention | None = None
        if context_dim is not None:
            self.norm2 = nn.LayerNorm(dim)
            self.attn2 = Attention(dim, heads, head_dim, context_dim=context_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, dropout=dropout)

    def forward(
        self, x: Tensor, context: Tensor | None = None, context_mask: Tensor | None = None
    ) -> Tensor:
        """``(B, N, dim) -> (B, N, dim)``."""
        x = x + self.attn1(self.norm1(x))
        if self.attn2 is not None and self.norm2 is not None:
            x = x + self.attn2(self.norm2(x), context, context_mask)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(ContextBlock):
    """LDM's transformer over the pixels of a feature map (Rombach et al. 2022, sec. 3.3).

    ``x + proj_out(blocks(proj_in(GN(x))))``; the projections are per-pixel linear maps
    (1x1 convolutions). ``proj_out`` is zero-initialised by the model.

    Args:
        channels: feature channels.
        heads: number of heads.
        head_dim: width of each head; the transformer width is ``heads * head_dim``.
        depth: number of :class:`TransformerBlock`.
        context_dim: width of the cross-attention context, or None.
        dropout: feed-forward dropout.
    """

    def __init__(
        self,
        channels: int,
        heads: int,
        head_dim: int,
        depth: int = 1,
        context_dim: int | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        inner = heads * head_dim
        self.norm = group_norm(channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, inner)
        self.blocks = nn.ModuleList(
            TransformerBlock(inner, heads, head_dim, context_dim, dropout) for _ in range(depth)
        )
        self.proj_out = nn.Linear(inner, channels)

    def forward(
        self, x: Tensor, context: Tensor | None = None, context_mask: Tensor | None = None
    ) -> Tensor:
        """``(B, C, *S) -> (B, C, *S)``."""
        h = self.proj_in(_tokens(self.norm(x)))  # (B, prod(S), inner)
        for block in self.blocks:
            h = block(h, context, context_mask)  # (B, prod(S), inner)
        return x + _pixels(self.proj_out(h), x.shape[2:])


def attention_modules(model: nn.Module) -> dict[str, Attention]:
    """Every :class:`Attention` in ``model``, by qualified module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, Attention)}


def set_attn_processor(
    model: nn.Module, processor: AttentionProcessor | Mapping[str, AttentionProcessor]
) -> None:
    """Install an attention processor in every :class:`Attention` of ``model``.

    Args:
        model: any module containing attention layers.
        processor: one processor for all layers, or a mapping from the names returned
            by :func:`attention_modules` to processors (it must name every layer).

    Raises:
        DifflabError: when a mapping misses a layer or names an unknown one.
    """
    modules = attention_modules(model)
    if isinstance(processor, Mapping):
        missing = sorted(set(modules) - set(processor))
        unknown = sorted(set(processor) - set(modules))
        if missing or unknown:
            raise DifflabError(
                f"set_attn_processor: the mapping must name every attention layer exactly; "
                f"missing {missing}, unknown {unknown}; the layers are {sorted(modules)}"
            )
        for name, module in modules.items():
            module.processor = processor[name]
    else:
        for module in modules.values():
            module.processor = processor
