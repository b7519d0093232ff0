"""Component families: the one registry of every buildable network, and its save / load format.

A *family* is one kind of component (the ADM U-Net, the noise-aware classifier, a frozen text
encoder; later autoencoders, DiT, ControlNet, adapters). Its registry entry holds

- its config dataclass: the family's only schema (fields, defaults, ``__post_init__``
  validation), as nanoGPT's ``GPTConfig`` is;
- ``build(config) -> nn.Module`` and its size presets;
- ``kind``: what the module computes (``denoiser``: a prediction shaped like its input;
  ``classifier``: logits; ``alignment``: image / text embeddings; ``text_encoder``: tokens);
- ``conditioning(config)``: the :class:`~difflab.cond.Cond` fields the built module reads;
- ``resolve(data) -> fields``: which of its fields come from the data and the other components
  (image size, channels, classes, context width), so a TOML section never repeats them.

A TOML section names a family with ``arch`` (``[model] arch = "unet"``) and its other keys are
checked against that family's dataclass (:meth:`Family.make_config`): an unknown key, a wrong
type or a bad value is rejected naming the section, the key and the family. Nothing outside
this module branches on a family's name.

A saved component is a folder (as diffusers' ``ConfigMixin`` folders are): ``config.json``
(``family``, ``version``, the full ``config``, optional ``metadata``) and ``model.safetensors``.
:func:`load` rebuilds it without any run config, weights identical; loading never executes code.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import json
import os
import shutil
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from difflab.errors import DifflabError

__all__ = ["DataSpec", "Family", "build", "families", "family_of", "get_family", "load",
           "register_family", "save"]

CONFIG_JSON = "config.json"
WEIGHTS = "model.safetensors"
FORMAT = "difflab-component"

# The modules that register the built-in families, imported on first lookup (so that
# ``difflab --help`` does not import every network).
BUILTIN_MODULES = (
    "difflab.networks.unet",
    "difflab.networks.dit",
    "difflab.networks.classifier",
    "difflab.networks.alignment",
    "difflab.networks.text",
    "difflab.latent.codec",
    "difflab.latent.autoencoder",
    "difflab.latent.vq",
    "difflab.baselines.vae",
    "difflab.baselines.dcgan",
)


@dataclass(frozen=True)
class DataSpec:
    """What the data and the other components give a trained network (filled by the task).

    Attributes:
        image_size: side of the training images (or latents).
        channels: their channels.
        num_classes: classes the network takes or predicts (None: not class-aware).
        context_dim: width of the text context the network attends to (None: no text).
        text_dim: width of the pooled sentence embeddings (alignment models).
        concat_channels: channels joined to the network input (a depth map: 1), or None.
    """

    image_size: int | None = None
    channels: int | None = None
    num_classes: int | None = None
    context_dim: int | None = None
    text_dim: int | None = None
    concat_channels: int | None = None


def image_fields(spec: DataSpec) -> dict[str, Any]:
    """The fields the data decides for an image network that is not conditioned on anything
    but its input: ``image_size`` and ``in_channels`` (a family's ``resolve``)."""
    out: dict[str, Any] = {}
    if spec.image_size is not None:
        out["image_size"] = spec.image_size
    if spec.channels is not None:
        out["in_channels"] = spec.channels
    return out


def image_shape(config: Any) -> tuple[int, ...]:
    """``(in_channels, image_size, ...)`` with ``dims`` (default 2) spatial sides: the input of
    the built-in image families."""
    dims = getattr(config, "dims", 2)
    return (config.in_channels, *([config.image_size] * dims))


def _no_data(spec: DataSpec) -> dict[str, Any]:
    return {}


def _reads_nothing(config: Any) -> frozenset[str]:
    return frozenset()


@dataclass(frozen=True)
class Family:
    """A registry entry (see the module docstring).

    Attributes:
        name: the ``arch`` value that names it.
        config: its config dataclass.
        build: ``build(config) -> nn.Module``.
        kind: ``denoiser``, ``classifier``, ``alignment``, ``text_encoder``, ...
        presets: named configs (``preset = "small"`` in a section).
        default_preset: the preset used when a section names none (None: the dataclass
            defaults).
        conditioning: ``conditioning(config)``: the ``Cond`` fields the module reads.
        resolve: ``resolve(data) -> {field: value}``: the fields the data decides.
        version: the layout of the family's weights; raised when parameter names change,
            with ``upgrade_weights`` converting older layouts.
        upgrade_weights: ``upgrade_weights(tensors, config, from_version) -> tensors``.
        scale_attention: a preset keeps attention at the same levels when ``image_size`` alone
            is overridden (``attention_resolutions`` scaled with it).
        pretrained: the module loads its own weights when built (a frozen text encoder).
        input_shape: ``input_shape(config) -> shape`` of one input without the batch (None:
            not an image network).
        learned_variance: ``learned_variance(config)``: the output carries iDDPM's variance
            channels beside the prediction.
        doc: one line for ``difflab families`` and errors.
    """

    name: str
    config: type
    build: Callable[[Any], Any]
    kind: str
    presets: Mapping[str, Any] = field(default_factory=dict)
    default_preset: str | None = None
    conditioning: Callable[[Any], frozenset[str]] = _reads_nothing
    resolve: Callable[[DataSpec], dict[str, Any]] = _no_data
    version: int = 1
    upgrade_weights: Callable[[dict, Any, int], dict] | None = None
    scale_attention: bool = True
    pretrained: bool = False
    input_shape: Callable[[Any], tuple[int, ...]] | None = None
    learned_variance: Callable[[Any], bool] = lambda config: False
    doc: str = ""

    # ----- configs ---------------------------------------------------------------------------
    def fields(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self.config)]

    def check_values(self, values: Mapping[str, Any], section: str = "model") -> dict[str, Any]:
        """Keys and types of ``values`` checked against the dataclass; every problem reported
        at once, each naming ``section.key`` and the family."""
        known = self.fields()
        hints = typing.get_type_hints(self.config)
        problems, checked = [], {}
        for key, value in values.items():
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                problems.append(f"{section}.{key}: unknown key{hint}; family {self.name!r} "
                                f"takes {', '.join(['arch', 'preset', *known])}")
                continue
            try:
                checked[key] = _coerce(hints[key], value)
            except ValueError as e:
                problems.append(f"{section}.{key}={value!r}: {e} (family {self.name!r})")
        if problems:
            raise DifflabError("; ".join(problems))
        return checked

    def make_config(self, values: Mapping[str, Any] | None = None, *, preset: str | None = None,
                    section: str = "model") -> Any:
        """The family's config from a preset (default: ``default_preset``) and ``values`` (a
        TOML section's keys): :meth:`check_values`, then the dataclass validates the values.

        Raises:
            DifflabError: for unknown keys, wrong types or bad values, naming the section key.
        """
        checked = self.check_values(dict(values or {}), section)
        name = preset if preset is not None else self.default_preset
        if name is not None and name not in self.presets:
            raise DifflabError(f"{section}.preset={name!r} is not a preset of family "
                               f"{self.name!r}: expected one of {sorted(self.presets)}")

        def make():
            if name is None:
                return self.config(**checked)
            base = self.presets[name]
            if not hasattr(base, "attention_resolutions"):
                return dataclasses.replace(base, **checked)
            from difflab.networks.layers import preset_config

            return preset_config(self.config, self.presets, name, checked,
                                 scale_attention=self.scale_attention)

        return self._validated(make, section)

    def config_from_dict(self, data: Mapping[str, Any], section: str = "config") -> Any:
        """Rebuild a config written by :meth:`config_dict` (every field given: no preset)."""
        checked = self.check_values(dict(data), section)
        return self._validated(lambda: self.config(**checked), section)

    def _validated(self, make: Callable[[], Any], section: str) -> Any:
        try:
            return make()
        except DifflabError as e:
            msg = str(e)
            raise DifflabError(msg if msg.startswith(f"{section}.") else
                               f"{section}.{msg} (family {self.name!r})") from None
        except (TypeError, ValueError) as e:
            raise DifflabError(f"[{section}] of family {self.name!r}: {e}") from None

    def config_dict(self, config: Any) -> dict[str, Any]:
        """A JSON / TOML-ready dict of every field (tuples as lists)."""
        return json.loads(json.dumps(dataclasses.asdict(config)))


def _coerce(annotation: Any, value: Any) -> Any:
    """Check ``value`` against a dataclass field's type (pydantic's lax mode: ``[1, 2]`` for a
    tuple, ``3`` for a float); returns the converted value or raises ``ValueError``."""
    from pydantic import ValidationError

    try:
        return _adapter(annotation).validate_python(value)
    except ValidationError as e:
        raise ValueError("; ".join(str(err["msg"]) for err in e.errors())) from None
    except TypeError:  # pragma: no cover - an annotation pydantic cannot check
        return value


_ADAPTERS: dict[Any, Any] = {}


def _adapter(annotation: Any):
    from pydantic import TypeAdapter

    key = repr(annotation)
    if key not in _ADAPTERS:
        _ADAPTERS[key] = TypeAdapter(annotation)
    return _ADAPTERS[key]


# ----- the registry ------------------------------------------------------------------------------
_FAMILIES: dict[str, Family] = {}
_LOADED = False


def register_family(family: Family) -> Family:
    """Add a family (a module defining one calls this at import). Re-registering the same
    name replaces the entry (a reloaded module)."""
    if not dataclasses.is_dataclass(family.config):
        raise DifflabError(f"family {family.name!r}: config must be a dataclass")
    _FAMILIES[family.name] = family
    return family


def _load_builtins() -> None:
    global _LOADED
    if not _LOADED:
        _LOADED = True
        for module in BUILTIN_MODULES:
            importlib.import_module(module)


def families() -> dict[str, Family]:
    """Every registered family, by name."""
    _load_builtins()
    return dict(_FAMILIES)


def get_family(name: str, kinds: tuple[str, ...] | None = None, section: str = "model") -> Family:
    """The family named ``name`` (optionally one of ``kinds``), or an error listing them."""
    _load_builtins()
    pool = {k: f for k, f in _FAMILIES.items() if kinds is None or f.kind in kinds}
    if name not in pool:
        what = f" of kind {' / '.join(kinds)}" if kinds else ""
        extra = ""
        if name in _FAMILIES:
            extra = f" (family {name!r} is a {_FAMILIES[name].kind}, not{what[8:]})"
        raise DifflabError(f"{section}.arch={name!r} is not a registered family{what}{extra}: "
                           f"expected one of {', '.join(sorted(pool)) or '(none)'}; a new family "
                           "registers itself with difflab.register_family")
    return pool[name]


def family_of(module: Any) -> tuple[Family, Any]:
    """``(family, config)`` of a module made by :func:`build` or :func:`load`."""
    tag = getattr(module, "_difflab_component", None)
    if tag is None:
        raise DifflabError(f"{type(module).__name__} was not built by difflab.build / load: it "
                           "has no family")
    return get_family(tag[0]), tag[1]


def _tag(module: Any, family: Family, config: Any) -> Any:
    object.__setattr__(module, "_difflab_component", (family.name, config))
    return module


# ----- build / save / load -----------------------------------------------------------------------
def build(family: str, config: Any = None, /, **values: Any) -> Any:
    """Build a component: ``build("unet", preset="tiny", in_channels=1)`` or
    ``build("unet", UNetConfig(...))``."""
    fam = get_family(family)
    if config is None:
        preset = values.pop("preset", None)
        config = fam.make_config(values, preset=preset, section=family)
    elif values:
        raise DifflabError("build: give a config object or keyword fields, not both")
    elif not isinstance(config, fam.config):
        raise DifflabError(f"build({family!r}, config): expected a {fam.config.__name__}, got "
                           f"{type(config).__name__}")
    return _tag(fam.build(config), fam, config)


def save(module: Any, directory: str | os.PathLike, metadata: Mapping[str, Any] | None = None,
         state_dict: Mapping[str, Any] | None = None) -> Path:
    """Write ``directory/config.json`` + ``model.safetensors`` atomically (temporary folder,
    then rename). ``state_dict`` overrides the module's own (e.g. EMA weights)."""
    from difflab.fileio import save_safetensors

    fam, config = family_of(module)
    out = Path(directory)
    if out.exists() and not (out / CONFIG_JSON).is_file() and any(out.iterdir()):
        raise DifflabError(f"{out} exists and is not a component folder: choose an empty or new "
                           "folder")
    tensors = state_dict if state_dict is not None else module.state_dict()
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    meta = {"format": FORMAT, "family": fam.name, "version": fam.version,
            "config": fam.config_dict(config), "metadata": dict(metadata or {})}
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / CONFIG_JSON).write_text(json.dumps(meta, indent=1) + "\n")
    save_safetensors(tensors, tmp / WEIGHTS, metadata={"family": fam.name,
                                                       "family_version": str(fam.version)})
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
    return out


def read_component_config(directory: str | os.PathLike) -> dict[str, Any]:
    """The parsed ``config.json`` of a component folder (checked to be one)."""
    d = Path(directory)
    f = d / CONFIG_JSON
    if not f.is_file():
        raise DifflabError(f"{d} is not a component folder: {CONFIG_JSON} is missing (write one "
                           "with difflab.save or difflab export RUN OUT)")
    try:
        meta = json.loads(f.read_text())
    except ValueError as e:
        raise DifflabError(f"{f} is not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or "family" not in meta:
        raise DifflabError(f"{f} is not a difflab component config (no format/family keys)")
    return meta


def load(directory: str | os.PathLike, device: Any = "cpu") -> Any:
    """Rebuild a component saved by :func:`save`: its family, config and weights."""
    import torch

    from difflab.training.checkpoint import check_compatible, read_safetensors

    d = Path(directory)
    meta = read_component_config(d)
    fam = get_family(meta["family"])
    config = fam.config_from_dict(meta.get("config", {}), section=f"{d / CONFIG_JSON}:config")
    with torch.random.fork_rng(devices=[]):  # the init is overwritten: spare the caller's RNG
        module = _tag(fam.build(config), fam, config)
    tensors = read_safetensors(d / WEIGHTS)
    tensors = upgrade_weights(fam, config, tensors, int(meta.get("version", 1)))
    check_compatible(module, tensors, f"component {d}")
    module.load_state_dict(tensors, strict=True)
    return module.to(device)


def upgrade_weights(fam: Family, config: Any, tensors: dict, version: int) -> dict:
    """Convert weights saved by an older layout of the family to the current one."""
    if version > fam.version:
        raise DifflabError(f"weights of family {fam.name!r} layout {version} are newer than "
                           f"this difflab's (layout {fam.version}): upgrade difflab")
    if version < fam.version:
        if fam.upgrade_weights is None:  # pragma: no cover - a family bumps with a converter
            raise DifflabError(f"no converter from layout {version} of family {fam.name!r}")
        tensors = fam.upgrade_weights(tensors, config, version)
    return tensors
