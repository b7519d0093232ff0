"""Tiny random-weight Stable Diffusion parts in SD's block structure, built locally with
``diffusers`` and ``transformers`` (no download), for parity tests and benchmarks.

``diffusers`` is a test and benchmark dependency of difflab, never a runtime one: it is imported
only inside these functions.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

CONTEXT = 24  # the text width of the tiny models (SD v1: 768, v2: 1024)
MAX_TOKENS = 16  # the tokenizer's limit (SD: 77)


def jitter(module: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> torch.nn.Module:
    """Perturb every parameter (norms and biases off their defaults), so each one matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return module.eval()


def tiny_unet(v2: bool = False, **overrides):
    """A ``UNet2DConditionModel`` shaped like SD's (three levels here, four in SD): SD v1's
    1x1-convolution projections with one head count, or SD v2's linear projections with one
    head width."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    args = dict(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64, 64),
                layers_per_block=1, cross_attention_dim=CONTEXT, norm_num_groups=32,
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
    if v2:
        args.update(use_linear_projection=True, attention_head_dim=(2, 4, 4))
    else:
        args.update(attention_head_dim=4)
    args.update(overrides)
    return jitter(UNet2DConditionModel(**args))


def tiny_vae(scaling_factor: float = 0.3):
    """An ``AutoencoderKL`` with SD's blocks: 4 latent channels, downsampling factor 2."""
    from diffusers import AutoencoderKL

    torch.manual_seed(1)
    return jitter(AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                                norm_num_groups=8, block_out_channels=(8, 16), layers_per_block=1,
                                sample_size=32, down_block_types=("DownEncoderBlock2D",) * 2,
                                up_block_types=("UpDecoderBlock2D",) * 2,
                                scaling_factor=scaling_factor), seed=1)


def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins byte-level BPE uses for bytes (GPT-2 / CLIP)."""
    keep = (list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD))
            + list(range(0xAE, 0x100)))
    out, extra = list(keep), 0
    for b in range(256):
        if b not in keep:
            out.append(256 + extra)
            extra += 1
    return [chr(c) for c in out]


def tiny_tokenizer():
    """A ``CLIPTokenizer`` over single bytes plus a few merges (SD's has 49,408 tokens)."""
    from transformers import CLIPTokenizer

    symbols = _byte_symbols()
    vocab: dict[str, int] = {}
    for s in symbols + [s + "</w>" for s in symbols]:
        vocab[s] = len(vocab)
    merges = [("r", "e"), ("re", "d</w>"), ("a", "p"), ("ap", "p"), ("app", "l"),
              ("appl", "e</w>"), ("c", "a"), ("ca", "t</w>")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_TOKENS)


def tiny_text_encoder(tokenizer, hidden: int = CONTEXT):
    """A ``CLIPTextModel`` (SD v1's text tower, shrunk)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(2)
    config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=37,
                            num_hidden_layers=2, num_attention_heads=4,
                            max_position_embeddings=MAX_TOKENS,
                            bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id)
    return jitter(CLIPTextModel(config), seed=2)


def sd_scheduler(kind: str = "ddim", v: bool = False, zero_snr: bool = False):
    """SD's scheduler config (scaled-linear betas 0.00085 -> 0.012, leading spacing with
    ``steps_offset=1``, ``set_alpha_to_one=False``); ``v``: SD 2's v-prediction."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

    common = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                  beta_schedule="scaled_linear", steps_offset=1,
                  prediction_type="v_prediction" if v else "epsilon")
    if zero_snr:
        common.update(rescale_betas_zero_snr=True, timestep_spacing="trailing", steps_offset=0)
    if kind == "ddim":
        return DDIMScheduler(clip_sample=False, set_alpha_to_one=False, **common)
    if kind == "euler":
        return EulerDiscreteScheduler(**common)
    if kind == "dpmpp_2m":
        return DPMSolverMultistepScheduler(**common)
    raise ValueError(kind)


def tiny_pipeline(folder: str | os.PathLike | None = None, v2: bool = False,
                  scheduler: str = "ddim", standard: bool = False):
    """A ``StableDiffusionPipeline`` of the tiny parts (images 32x32, latents 16x16x4), saved to
    ``folder`` in diffusers' layout when given.

    ``standard``: the settings SD's weights do not show are SD's own, so a single file of it
    reads without a config: 8 U-Net heads (v1) or 64-wide ones (v2), 64-wide CLIP heads,
    quick-GELU (v1) or GELU (v2, OpenCLIP), 32 VAE norm groups."""
    from diffusers import StableDiffusionPipeline

    tok = tiny_tokenizer()
    if standard:
        from diffusers import AutoencoderKL
        from transformers import CLIPTextConfig, CLIPTextModel

        torch.manual_seed(2)
        text = jitter(CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=1, max_position_embeddings=MAX_TOKENS,
            hidden_act="gelu" if v2 else "quick_gelu", bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)), seed=2)
        widths = (64, 128, 128) if v2 else (32, 64, 64)
        unet = tiny_unet(v2, cross_attention_dim=64, block_out_channels=widths,
                         attention_head_dim=(1, 2, 2) if v2 else 8)
        torch.manual_seed(1)
        vae = jitter(AutoencoderKL(latent_channels=4, norm_num_groups=32,
                                   block_out_channels=(32, 64), layers_per_block=1,
                                   down_block_types=("DownEncoderBlock2D",) * 2,
                                   up_block_types=("UpDecoderBlock2D",) * 2,
                                   scaling_factor=0.18215), seed=1)
    else:
        text, unet, vae = tiny_text_encoder(tok), tiny_unet(v2), tiny_vae()
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text, tokenizer=tok, unet=unet,
        scheduler=sd_scheduler(scheduler, v=v2), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    if folder is not None:
        pipe.save_pretrained(Path(folder))
    return pipe
