"""Stable Diffusion's original single-file layout (``model.diffusion_model.``,
``first_stage_model.``, ``cond_stage_model.``): the files difflab writes are read by diffusers'
own converters as the weights they came from, and the files difflab reads (``.safetensors`` or
``.ckpt``, with or without a config) sample the images of the pipeline they came from."""

from __future__ import annotations

import shutil

import pytest
import torch

import difflab
from difflab.errors import DifflabError
from difflab.interop.single_file import pipeline_to_single_file, read_checkpoint
from difflab.samplers import PerSampleNoise
from difflab.sampling import SampleRequest, generate, sample_seeds
from difflab.testing.sd import tiny_pipeline


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFLAB_CACHE", str(tmp_path / "cache"))


@pytest.mark.parametrize("v2", [False, True], ids=["sd1_clip", "sd2_open_clip"])
def test_written_files_are_what_diffusers_converters_read(tmp_path, v2):
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        convert_open_clip_checkpoint,
    )

    pipe = tiny_pipeline(tmp_path / "sd", v2=v2)
    state = read_checkpoint(pipeline_to_single_file(tmp_path / "sd", tmp_path / "m.safetensors"))
    for part, got in (("unet", convert_ldm_unet_checkpoint(state, dict(pipe.unet.config))),
                      ("vae", convert_ldm_vae_checkpoint(state, dict(pipe.vae.config)))):
        ref = getattr(pipe, part).state_dict()
        assert set(got) == set(ref), part
        for k, v in ref.items():
            assert torch.equal(got[k].reshape(v.shape), v), k
    text = (convert_open_clip_checkpoint(pipe.text_encoder, state) if v2
            else convert_ldm_clip_checkpoint(state))
    for k, v in pipe.text_encoder.state_dict().items():
        assert torch.equal(text["text_model." + k], v), k
    assert any(k.startswith("cond_stage_model.model." if v2 else "cond_stage_model.transformer.")
               for k in state)
    assert "betas" in state and "alphas_cumprod" in state


@pytest.mark.parametrize("v2", [False, True], ids=["sd1_eps", "sd2_v"])
def test_a_single_file_without_config_samples_its_pipelines_images(tmp_path, v2):
    """SD's own settings (heads, activations, groups, prediction) fill in what the weights do
    not show; the tokenizer comes from a tokenizer/ folder beside the file."""
    pipe = tiny_pipeline(tmp_path / "sd", v2=v2, standard=True)
    pipeline_to_single_file(tmp_path / "sd", tmp_path / "file" / "model.safetensors")
    shutil.copytree(tmp_path / "sd" / "tokenizer", tmp_path / "file" / "tokenizer")
    run = difflab.load(tmp_path / "file" / "model.safetensors")
    assert run.config.task.prediction == ("v" if v2 else "eps")
    size = 96 if v2 else 64  # SD's latent sizes: 768 px (v2) and 512 px (v1)
    assert run.sample_shape == (4, size, size)
    kw = dict(prompts=["red apple"], steps=3, sampler="ddim", guidance="cfg:3", n=1, seed=1)
    ours = generate(SampleRequest(run, **kw)).images
    x = run.denoiser.path.prior_sample((1, *run.sample_shape),
                                       noise=PerSampleNoise(sample_seeds(1, 1)))
    ref = pipe(["red apple"], num_inference_steps=3, guidance_scale=3.0, latents=x,
               height=2 * size, width=2 * size, output_type="pt").images
    assert float((((ours + 1) / 2).clamp(0, 1) - ref).abs().max()) <= 1e-5


def test_a_ckpt_with_a_config_folder_and_code_is_refused(tmp_path):
    pipe = tiny_pipeline(tmp_path / "sd")
    pipeline_to_single_file(tmp_path / "sd", tmp_path / "m.safetensors")
    state = read_checkpoint(tmp_path / "m.safetensors")
    torch.save({"state_dict": state, "global_step": 10}, tmp_path / "m.ckpt")
    run = difflab.load(tmp_path / "m.ckpt", config=tmp_path / "sd")  # tokenizer: the folder's
    kw = dict(prompts=["a cat"], steps=3, sampler="ddim", guidance="cfg:2", n=1, seed=4)
    ours = generate(SampleRequest(run, **kw)).images
    x = run.denoiser.path.prior_sample((1, *run.sample_shape),
                                       noise=PerSampleNoise(sample_seeds(4, 1)))
    ref = pipe(["a cat"], num_inference_steps=3, guidance_scale=2.0, latents=x,
               output_type="pt").images
    assert float((((ours + 1) / 2).clamp(0, 1) - ref).abs().max()) <= 1e-5

    class Boom:
        def __reduce__(self):
            return (print, ("ran code",))

    torch.save({"state_dict": {"a": Boom()}}, tmp_path / "evil.ckpt")
    with pytest.raises(DifflabError, match="plain tensors"):
        difflab.load(tmp_path / "evil.ckpt", config=tmp_path / "sd")


def test_bad_single_files_are_named(tmp_path):
    from safetensors.torch import save_file

    tiny_pipeline(tmp_path / "sd")
    f = pipeline_to_single_file(tmp_path / "sd", tmp_path / "m.safetensors")
    state = read_checkpoint(f)
    # no tokenizer anywhere
    with pytest.raises(DifflabError, match="holds no tokenizer"):
        difflab.load(f)
    # a weight no part reads, and one the U-Net lacks
    extra = dict(state)
    extra["model.diffusion_model.extra.weight"] = torch.zeros(1)
    gone = "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_v.weight"
    extra.pop(gone)
    save_file(extra, str(tmp_path / "bad.safetensors"))
    with pytest.raises(DifflabError) as e:
        difflab.load(tmp_path / "bad.safetensors", config=tmp_path / "sd")
    assert "model.diffusion_model.extra.weight" in str(e.value)
    # the missing weight is named in diffusers' terms
    assert "mid_block.attentions.0.transformer_blocks.0.attn2.to_v.weight" in str(e.value)
    # text-encoder weights that do not fill the CLIP config
    short = {k: v for k, v in state.items() if "encoder.layers.1." not in k}
    save_file(short, str(tmp_path / "short.safetensors"))
    with pytest.raises(DifflabError, match="text encoder weights do not match.*missing"):
        difflab.load(tmp_path / "short.safetensors", config=tmp_path / "sd")


def test_a_v2_file_with_a_v1_yaml_is_detected(tmp_path):
    tiny_pipeline(tmp_path / "sd", v2=True, standard=True)
    f = pipeline_to_single_file(tmp_path / "sd", tmp_path / "v2.safetensors")
    shutil.copytree(tmp_path / "sd" / "tokenizer", tmp_path / "tokenizer")
    # SD v1's inference YAML beside the file (the A1111 convention: NAME.yaml)
    (tmp_path / "v2.yaml").write_text(
        "model:\n  params:\n    linear_start: 0.00085\n    linear_end: 0.012\n"
        "    unet_config:\n      params:\n        context_dim: 768\n        num_heads: 8\n"
        "        use_linear_in_transformer: false\n")
    with pytest.raises(DifflabError, match="SD v2 U-Net.*a v2 checkpoint with a v1 config"):
        difflab.load(f)
    # the right YAML (SD 2's, v-prediction) reads
    (tmp_path / "v2.yaml").write_text(
        "model:\n  params:\n    parameterization: v\n    unet_config:\n      params:\n"
        "        context_dim: 64\n        num_head_channels: 64\n"
        "        use_linear_in_transformer: true\n")
    run = difflab.load(f)
    assert run.config.task.prediction == "v"


def test_convert_and_sample_single_files_from_the_command_line(tmp_path, capsys):
    from difflab.cli import main

    tiny_pipeline(tmp_path / "sd")
    assert main(["convert", str(tmp_path / "sd"), str(tmp_path / "m.safetensors")]) == 0
    assert main(["convert", str(tmp_path / "m.safetensors"), str(tmp_path / "back"),
                 "--sd-config", str(tmp_path / "sd")]) == 0
    assert (tmp_path / "back" / "model_index.json").is_file()
    assert main(["sample", str(tmp_path / "m.safetensors"), "--sd-config", str(tmp_path / "sd"),
                 "--prompt", "red apple", "--steps", "2", "--out",
                 str(tmp_path / "a.png")]) == 0
    assert (tmp_path / "a.png").is_file()
    capsys.readouterr()
    for argv in (["sample", str(tmp_path / "m.safetensors"), "--prompt", "x", "--steps", "2",
                  "--out", str(tmp_path / "b.png")],  # no tokenizer
                 ["sample", str(tmp_path / "m.safetensors"), "--tokenizer",
                  str(tmp_path / "nowhere"), "--out", str(tmp_path / "c.png")],
                 ["convert", str(tmp_path / "m.safetensors"), str(tmp_path / "back")]):
        try:
            code = main(argv)
        except SystemExit as e:  # argparse's own checks exit with 2
            code = e.code
        assert code == 2, argv
        err = capsys.readouterr().err
        assert "Traceback" not in err and err.strip(), argv
    assert not (tmp_path / "b.png").exists()


def test_a_float16_file_runs_in_float32(tmp_path):
    from safetensors.torch import save_file

    tiny_pipeline(tmp_path / "sd")
    state = read_checkpoint(pipeline_to_single_file(tmp_path / "sd", tmp_path / "m.safetensors"))
    save_file({k: v.half() for k, v in state.items()}, str(tmp_path / "half.safetensors"))
    kw = dict(prompts=["red apple"], steps=3, sampler="ddim", guidance="cfg:2", n=1, seed=2)
    full = generate(SampleRequest(difflab.load(tmp_path / "m.safetensors",
                                               config=tmp_path / "sd"), **kw)).images
    run = difflab.load(tmp_path / "half.safetensors", config=tmp_path / "sd")
    assert next(run.net.parameters()).dtype == torch.float32
    assert next(run.conditioner.encoder.model.parameters()).dtype == torch.float32
    half = generate(SampleRequest(run, **kw)).images
    # the same model up to float16 rounding of the weights
    assert 0 < float((half - full).abs().max()) < 0.05
