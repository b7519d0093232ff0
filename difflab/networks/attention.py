"""Attention for the diffusion U-Nets, behind a replaceable attention processor.

Every attention layer is an :class:`Attention` module. It projects queries, keys and
values, splits heads, and hands ``(q, k, v, mask)`` to ``self.processor``; the default
:class:`SDPAProcessor` calls ``torch.nn.functional.scaled_dot_product_attention``
(Vaswani et al. 2017, eq. 1: ``softmax(q k^T / sqrt(d)) v``). Swapping the processor
(:func:`set_attn_processor`) is how LoRA, prompt-to-prompt and attention visualisation
hook every attention in a model without touching the network code.

Two spatial wrappers use it: :class:`AttentionBlock` (ADM's self-attention over the
pixels of a feature map, Dhariwal & Nichol 2021 sec. 3) and :class:`SpatialTransformer`
(LDM's transformer with cross-attention to a context, Rombach et al. 2022 sec. 3.3).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import torch.nn.functional as F
from torch import Tensor, nn

from difflab.errors import DifflabError
from difflab.networks.layers import group_norm

__all__ = [
    "Attention",
    "AttentionBlock",
    "AttentionProcessor",
    "FeedForward",
    "SDPAProcessor",
    "SpatialTransformer",
    "TransformerBlock",
    "attention_modules",
    "set_attn_processor",
]


class AttentionProcessor(Protocol):
    """What an attention processor is: ``processor(module, q, k, v, mask) -> out``.

    ``q`` is ``(B, heads, N, head_dim)``, ``k`` and ``v`` are ``(B, heads, L, head_dim)``
    (``L = N`` for self-attention), ``mask`` is None or a boolean tensor broadcastable to
    ``(B, heads, N, L)`` that is True where a key may be attended to. The result is
    ``(B, heads, N, head_dim)``. ``module`` is the calling :class:`Attention` (it carries
    ``heads``, ``head_dim``, ``is_cross`` and the projections).
    """

    def __call__(
        self, module: Attention, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None
    ) -> Tensor: ...


class SDPAProcessor:
    """The default processor: PyTorch's fused ``scaled_dot_product_attention``."""

    def __call__(
        self, module: Attention, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None
    ) -> Tensor:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    def __repr__(self) -> str:
        return "SDPAProcessor()"


class Attention(nn.Module):
    """Multi-head attention over token sequences (Vaswani et al. 2017, sec. 3.2.2).

    Self-attention when ``context_dim`` is None (one fused q/k/v projection
    ``to_qkv``), cross-attention to a ``context (B, L, context_dim)`` otherwise
    (``to_q`` from the input, fused ``to_kv`` from the context). ``is_cross`` records which.

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
        split = (self.heads, self.head_dim)
        if self.is_cross:
            if context is None:
                raise ValueError("cross-attention needs a context (B, L, context_dim)")
            q = self.to_q(x).unflatten(-1, split).transpose(1, 2)  # (B, h, N, d)
            k, v = self.to_kv(context).unflatten(-1, (2, *split)).permute(2, 0, 3, 1, 4)
        else:
            q, k, v = self.to_qkv(x).unflatten(-1, (3, *split)).permute(2, 0, 3, 1, 4)
        mask, empty = None, None
        if context_mask is not None:
            mask = context_mask[:, None, None, :]  # (B, 1, 1, L)
            has_token = context_mask.any(dim=-1)
            if not bool(has_token.all()):  # avoid an all -inf softmax row (NaN)
                empty = ~has_token[:, None, None, None]
                mask = mask | empty
        out = self.processor(self, q, k, v, mask)  # (B, h, N, d)
        if empty is not None:
            out = out.masked_fill(empty, 0.0)
        return self.to_out(out.transpose(1, 2).flatten(2))  # (B, N, dim)


def _tokens(x: Tensor) -> Tensor:
    """``(B, C, H, W) -> (B, HW, C)``; a free view for channels_last input."""
    return x.flatten(2).transpose(1, 2)


def _pixels(tokens: Tensor, size: tuple[int, int]) -> Tensor:
    """``(B, HW, C) -> (B, C, H, W)``; channels_last in memory, no copy."""
    return tokens.transpose(1, 2).unflatten(2, size)


class AttentionBlock(nn.Module):
    """ADM's self-attention over the pixels of a feature map, with a residual.

    ``x + proj_out(attention(GN(x)))`` where every pixel is a token (DDPM App. B;
    ADM sec. 3 uses several heads). ``attn.to_out`` is zero-initialised by the model.

    Args:
        channels: feature channels (the token width).
        heads: number of heads.
        head_dim: width of each head (``heads * head_dim`` is usually ``channels``).
    """

    def __init__(self, channels: int, heads: int, head_dim: int) -> None:
        super().__init__()
        self.norm = group_norm(channels)
        self.attn = Attention(channels, heads, head_dim, qkv_bias=True)

    def forward(
        self,
        x: Tensor,
        emb: Tensor | None = None,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
    ) -> Tensor:
        """``(B, C, H, W) -> (B, C, H, W)``; the conditioning arguments are ignored."""
        out = self.attn(_tokens(self.norm(x)))  # (B, HW, C)
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


class SpatialTransformer(nn.Module):
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
        self,
        x: Tensor,
        emb: Tensor | None = None,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
    ) -> Tensor:
        """``(B, C, H, W) -> (B, C, H, W)``; ``emb`` is ignored."""
        h = self.proj_in(_tokens(self.norm(x)))  # (B, HW, inner)
        for block in self.blocks:
            h = block(h, context, context_mask)  # (B, HW, inner)
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
