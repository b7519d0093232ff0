"""Run configurations: a TOML file with sections ``[path] [model] [objective] [data] [train]
[sample]``, validated by pydantic on load, overridable key by key (``--set train.lr=1e-4``).

Every section rejects unknown keys; an error names the full dotted key (``train.lrr``), the
value, and what is accepted. ``[objective]`` and ``[data]`` take, beside their fixed keys, the
keyword options of the chosen objective / dataset class, checked against their signatures.

:mod:`difflab.builders` turns a validated config into library objects (``build_path``,
``build_model``, ``build_denoiser``, ``build_objective``, ``build_dataset``).
"""

from __future__ import annotations

import difflib
import inspect
import os
import sys
from pathlib import Path
from typing import Any, Literal

import tomli_w
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from difflab.errors import DifflabError, bad_value

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

SECTIONS = ("path", "model", "task", "objective", "data", "train", "sample", "text_encoder",
            "codec")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# ----- [path] ----------------------------------------------------------------------------------
def _path_constructors() -> dict[str, Any]:
    from difflab.paths import EDM, GVP, VE, VP, Linear, SubVP

    return {"discrete_linear": VP.discrete_linear, "discrete_cosine": VP.discrete_cosine,
            "discrete_scaled_linear": VP.discrete_scaled_linear,
            "discrete": VP.discrete, "vp_linear": VP.linear, "vp_cosine": VP.cosine,
            "subvp": SubVP, "ve": VE, "edm": EDM, "linear": Linear, "gvp": GVP}


PathKind = Literal["discrete_linear", "discrete_cosine", "discrete_scaled_linear", "discrete",
                   "vp_linear", "vp_cosine", "subvp", "ve", "edm", "linear", "gvp"]
Pos = Field(default=None, gt=0)


class PathConfig(Section):
    """The forward process: ``kind`` and the parameters of its constructor (others rejected).

    ``discrete_linear``: N, beta_start, beta_end (DDPM); ``discrete_scaled_linear``: the same
    keys, linear in ``sqrt(beta)`` (LDM / Stable Diffusion); ``discrete_cosine``: N, s, max_beta
    (iDDPM eq. 17); ``discrete``: betas; ``vp_linear``: beta_min, beta_max, t_min;
    ``vp_cosine``: s, t_min, t_max; ``subvp`` / ``ve``: beta or sigma range, t_min, t_max;
    ``edm``: sigma_min, sigma_max; ``linear`` / ``gvp``: t_min, t_max. Unset = the default.
    The discrete kinds also take ``zero_snr`` (Lin et al. 2024: betas rescaled so the last
    step is pure noise; needs ``task.prediction = "v"`` or ``"x0"``).
    """

    kind: PathKind = "discrete_linear"
    N: int | None = Field(default=None, ge=1)
    beta_start: float | None = Pos
    beta_end: float | None = Pos
    s: float | None = Pos
    max_beta: float | None = Pos
    betas: list[float] | None = None
    beta_min: float | None = Field(default=None, ge=0)
    beta_max: float | None = Pos
    sigma_min: float | None = Pos
    sigma_max: float | None = Pos
    t_min: float | None = Pos
    t_max: float | None = Pos
    zero_snr: bool | None = None

    @model_validator(mode="after")
    def _params_of_kind(self) -> PathConfig:
        accepted = path_params(self.kind)
        for name in type(self).model_fields:
            if name != "kind" and getattr(self, name) is not None and name not in accepted:
                raise ValueError(f"path.{name} is not a parameter of kind={self.kind!r}: its "
                                 f"parameters are {', '.join(accepted)}")
        return self

    def params(self) -> dict[str, Any]:
        return {k: v for k, v in self.model_dump(exclude={"kind"}).items() if v is not None}


def path_params(kind: str) -> list[str]:
    """Keyword parameters of the path constructor for ``kind``."""
    return list(inspect.signature(_path_constructors()[kind]).parameters)


# ----- [model] and the other family sections -------------------------------------------------
class FamilySection(BaseModel):
    """A section naming a component family (``arch``) with its fields as the other keys, checked
    against the family's config dataclass by :func:`difflab.components.get_family` (the family's
    own schema: this module holds no copy of any network's fields)."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)

    arch: str = "unet"
    preset: str | None = None

    def values(self) -> dict[str, Any]:
        """The family fields given (every key but ``arch`` and ``preset``)."""
        return dict(self.model_extra or {})


class TextEncoderSection(BaseModel):
    """``[text_encoder]``: the frozen text encoder (family ``text_encoder``): ``name``
    (``minilm``, a local ``transformers`` folder) and ``max_length``."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)

    def values(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class CodecSection(Section):
    """``[codec]``: train and sample a diffusion model on the latents of a trained, frozen
    codec (latent diffusion, Rombach et al. 2022). ``run``: an autoencoder run folder (its
    newest checkpoint), a checkpoint folder, or a component folder of ``difflab export``;
    ``cache``: encode the training images once into ``$DIFFLAB_CACHE/latents`` (the posterior
    moments, keyed by the codec's and the images' hashes) instead of at every step;
    ``scale``: replaces the codec's own latent scale factor; ``sample_posterior``: train on
    posterior samples (LDM) rather than posterior means."""

    run: str
    cache: bool = False
    scale: float | None = Field(default=None, gt=0)
    sample_posterior: bool = True


class TaskConfig(Section):
    """``[task]``: what is trained (:mod:`difflab.tasks`): ``kind`` names a registered training
    task (``diffusion``, ``classifier``, ``contrastive``). The diffusion task reads the rest:
    ``prediction`` (what the network outputs), ``precond`` / ``sigma_data`` (EDM's input and
    output scalings), ``cond`` (``none``, ``class``: labels with a null class, ``text``:
    captions through ``[text_encoder]``), ``p_uncond`` (condition dropout for
    classifier-free guidance, Ho & Salimans 2022, Alg. 1) and ``concat`` (``depth``: the data's
    depth maps joined to the network input, as SD 2's depth model takes them). The residual task
    (SN- / NPR-DPM's second head, :mod:`difflab.tasks.residual`) reads ``base`` (the frozen
    diffusion run whose noise predictor it completes) and ``init`` (``base``: start from the
    base network's weights with a zeroed output layer; ``scratch``: ``[model]``'s network)."""

    kind: str = "diffusion"
    prediction: Literal["eps", "x0", "v", "score", "velocity"] = "eps"
    precond: Literal["none", "edm"] = "none"
    sigma_data: float = Field(default=0.5, gt=0)
    cond: Literal["none", "class", "text"] = "none"
    p_uncond: float = Field(default=0.0, ge=0, lt=1)
    concat: Literal["none", "depth"] = "none"
    base: str | None = None
    init: Literal["base", "scratch"] = "base"

    @model_validator(mode="after")
    def _check_kind(self) -> TaskConfig:
        from difflab.tasks import get_task

        task = get_task(self.kind)
        given = [k for k in self.model_fields_set if k != "kind" and k not in task.options
                 and getattr(self, k) != type(self).model_fields[k].default]
        if given:
            raise ValueError(f"task.{sorted(given)[0]} does not apply to task kind "
                             f"{self.kind!r}: it reads {', '.join(task.options) or 'no options'}")
        return self


# ----- [objective] and [data]: fixed keys plus the options of what they name -------------------
class OpenSection(BaseModel):
    """A section whose extra keys are the options of a named factory, checked on load."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)

    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})

    def _check_options(self, section: str, accepted: list[str], what: str) -> None:
        fixed = [k for k in type(self).model_fields if k not in accepted]
        for key in self.options():
            if key not in accepted:
                raise ValueError(_unknown(f"{section}.{key}", key, fixed + accepted, what))


def _unknown(dotted: str, key: str, accepted: list[str] | tuple[str, ...], what: str) -> str:
    close = difflib.get_close_matches(key, accepted, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"{dotted}: unknown key{hint}; {what}: {', '.join(accepted) or '(none)'}"


class ObjectiveConfig(OpenSection):
    """``name`` of :data:`difflab.objectives.OBJECTIVES` plus its options (``target``, ...)."""

    name: str | None = None  # None: the task's default objective

    @model_validator(mode="after")
    def _check(self) -> ObjectiveConfig:
        from difflab.objectives import OBJECTIVES, objective_options

        if self.name is None:
            return self
        if self.name not in OBJECTIVES:
            raise ValueError(f"objective.name={self.name!r} is not valid: expected one of "
                             f"{', '.join(OBJECTIVES)}")
        self._check_options("objective", objective_options(self.name),
                            f"allowed keys of [objective] with name={self.name!r}")
        return self


class DataConfig(OpenSection):
    """``name`` of :data:`difflab.data.DATASETS`, the common keys, plus dataset options."""

    name: str = "digits"
    root: str | None = None
    image_size: int | None = Field(default=None, ge=1)
    split: Literal["train", "test", "all"] = "train"
    num_workers: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        self._check_options("data", dataset_options(self.name),
                            f"allowed keys of [data] with name={self.name!r}")
        return self


_COMMON_DATA_ARGS = {"self", "root", "image_size", "split", "transform", "kwargs"}


def dataset_options(name: str) -> list[str]:
    """Extra keyword options the dataset ``name`` accepts (its class's signature)."""
    from difflab.data import CIFAR10, DATASETS, MNIST, Digits, FashionMNIST, ImageFolder

    key = str(name).lower().replace("-", "_")
    if key not in DATASETS:
        raise ValueError(f"data.name={name!r} is not valid: expected one of {sorted(DATASETS)}")
    from difflab.data.shapes import Shapes

    classes = {"digits": Digits, "mnist": MNIST, "fashion_mnist": FashionMNIST,
               "folder": ImageFolder, "emoji": ImageFolder, "cifar10": CIFAR10, "shapes": Shapes}
    cls = classes.get(key)
    if cls is None:  # a dataset registered later: accept what its builder accepts
        return [p for p in inspect.signature(DATASETS[key]).parameters
                if p not in _COMMON_DATA_ARGS]
    return [p for p in inspect.signature(cls.__init__).parameters if p not in _COMMON_DATA_ARGS]


# ----- [train] and [sample] ----------------------------------------------------------------------
class TrainConfig(Section):
    """Optimisation. ``batch_size`` is the global batch of one optimizer step (summed over
    processes and accumulation steps); it must divide by ``processes * grad_accum``."""

    seed: int = Field(default=0, ge=0)
    steps: int = Field(default=10_000, ge=1)
    batch_size: int = Field(default=128, ge=1)
    lr: float = Field(default=2e-4, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = Field(default=1e-8, gt=0)
    warmup_steps: int = Field(default=0, ge=0)
    grad_clip: float = Field(default=1.0, ge=0)
    grad_accum: int = Field(default=1, ge=1)
    ema_decay: float = Field(default=0.9999, ge=0, lt=1)
    ema_warmup: bool = True
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    log_every: int = Field(default=100, ge=1)
    sample_every: int = Field(default=0, ge=0)
    # the preview grids (every sample_every steps and at the end): a fast solver by default,
    # "sample" = the [sample] section's sampler and steps (e.g. DDPM's 1000 steps)
    preview_sampler: str = "dpmpp_2m"
    preview_steps: int = Field(default=20, ge=1)
    checkpoint_every: int = Field(default=1000, ge=1)
    keep_checkpoints: int = Field(default=3, ge=1)
    channels_last: bool = False
    tensorboard: bool = True

    @field_validator("adam_betas")
    @classmethod
    def _betas(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in v):
            raise ValueError(f"train.adam_betas={list(v)}: expected two numbers in [0, 1)")
        return v

    @field_validator("preview_sampler")
    @classmethod
    def _preview_sampler(cls, v: str) -> str:
        from difflab.samplers import SAMPLERS

        if v != "sample" and v not in SAMPLERS:
            raise ValueError(f"train.preview_sampler={v!r} is not valid: expected 'sample' (the "
                             f"[sample] settings) or one of {', '.join(sorted(SAMPLERS))}")
        return v


class SampleConfig(Section):
    """Sampling defaults (training previews, ``difflab sample``): a sampler of
    :data:`difflab.samplers.SAMPLERS`, a grid of :mod:`difflab.samplers.timesteps` (``auto``:
    ``discrete`` on discrete paths, ``karras`` on VE / EDM, ``uniform`` otherwise).
    ``clip_x0`` clips every clean-data estimate to ``[-1, 1]`` (DDPM's ``clip_denoised``;
    for pixel data only, not for latents)."""

    sampler: str = "ddim"
    steps: int = Field(default=50, ge=1)
    grid: str = "auto"
    grid_options: dict[str, Any] = Field(default_factory=dict)
    n: int = Field(default=64, ge=1)
    seed: int = Field(default=0, ge=0)
    batch_size: int = Field(default=256, ge=1)
    clip_x0: bool = False
    options: dict[str, Any] = Field(default_factory=dict)
    prompts: list[str] = Field(default_factory=list)
    guidance: str | None = None

    @model_validator(mode="after")
    def _check(self) -> SampleConfig:
        if self.guidance is not None:
            from difflab.guidance.spec import parse_guidance

            parse_guidance(self.guidance)
        from difflab.samplers import SAMPLERS
        from difflab.samplers.timesteps import GRIDS, TUNED

        if self.sampler not in SAMPLERS:
            raise ValueError(f"sample.sampler={self.sampler!r} is not valid: expected one of "
                             f"{', '.join(sorted(SAMPLERS))}")
        accepted = [o for o in SAMPLERS[self.sampler].options() if o not in ("noise", "hooks")]
        for key in self.options:
            if key not in accepted:
                raise ValueError(_unknown(f"sample.options.{key}", key, accepted,
                                          f"options of sampler {self.sampler!r}"))
        if self.grid not in ("auto", TUNED) and self.grid not in GRIDS:
            raise ValueError(f"sample.grid={self.grid!r} is not valid: expected 'auto', "
                             f"'{TUNED}' or one of {', '.join(GRIDS)}")
        return self


CONFIG_VERSION = 2


class Config(Section):
    """A whole run: every section has defaults, so ``Config()`` is valid. ``version`` is the
    layout of the file (1: before component families and tasks; :mod:`difflab.upgrade`
    converts it)."""

    version: int = CONFIG_VERSION
    path: PathConfig = Field(default_factory=PathConfig)
    model: FamilySection = Field(default_factory=FamilySection)
    task: TaskConfig = Field(default_factory=TaskConfig)
    objective: ObjectiveConfig = Field(default_factory=ObjectiveConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    sample: SampleConfig = Field(default_factory=SampleConfig)
    text_encoder: TextEncoderSection | None = None
    codec: CodecSection | None = None

    @model_validator(mode="after")
    def _check_parts(self) -> Config:
        """``[model]``'s family is one the task trains and its keys are that family's; the
        objective is one the task can optimise (default: the task's own)."""
        from difflab.components import get_family
        from difflab.tasks import get_task

        if self.version != CONFIG_VERSION:
            raise ValueError(f"version={self.version}: this difflab reads config version "
                             f"{CONFIG_VERSION}; convert older files with difflab upgrade FILE")
        task = get_task(self.task.kind)
        try:
            fam = get_family(self.model.arch, task.family_kinds, "model")
            values = fam.check_values(self.model.values(), "model")
            if self.model.preset is not None and self.model.preset not in fam.presets:
                raise DifflabError(f"model.preset={self.model.preset!r} is not a preset of "
                                   f"family {fam.name!r}: expected one of {sorted(fam.presets)}")
            # the values themselves, at the data's size when [data] names one (the task fills
            # the other data-decided fields when it is built)
            if (self.data.image_size is not None and "image_size" in fam.fields()
                    and self.codec is None):  # (with a codec the task gives the latent size)
                values.setdefault("image_size", self.data.image_size)
            fam.make_config(values, preset=self.model.preset, section="model")
            if self.text_encoder is not None:
                get_family("text_encoder").check_values(self.text_encoder.values(),
                                                        "text_encoder")
        except DifflabError as e:
            raise ValueError(str(e)) from None
        name = self.objective.name or task.default_objective
        if name not in task.objectives:
            raise ValueError(f"objective.name={name!r} does not train task kind "
                             f"{self.task.kind!r}: expected one of {', '.join(task.objectives)}")
        if self.objective.name is None:  # (no assignment: it would re-run this validator)
            self.__dict__["objective"] = ObjectiveConfig(name=name, **self.objective.options())
        task.check_config(self)
        return self


# ----- loading, overrides, saving ----------------------------------------------------------------
def parse_override(item: str) -> tuple[list[str], Any]:
    """``"a.b=value"`` -> ``(["a", "b"], value)``; the value is a TOML literal when it parses as
    one (``1e-4``, ``true``, ``[1, 2]``, ``"x"``), else the raw string."""
    key, sep, raw = item.partition("=")
    keys = key.strip().split(".")
    if not sep or not all(k.strip() for k in keys):
        raise bad_value("--set", item, "KEY=VALUE with a dotted key, e.g. train.lr=1e-4")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return [k.strip() for k in keys], value


def apply_overrides(raw: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Apply ``--set`` items to a raw (unvalidated) config dict, in order."""
    for item in overrides:
        keys, value = parse_override(item)
        node = raw
        for depth, k in enumerate(keys[:-1]):
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise DifflabError(f"--set {item}: {'.'.join(keys[:depth + 1])} is a value, "
                                   "not a section")
        node[keys[-1]] = value
    return raw


def config_from_dict(raw: dict[str, Any], source: str = "config", upgrade: bool = False
                     ) -> Config:
    """Validate a raw dict; errors become one :class:`DifflabError` naming every bad key.

    A version-1 dict (written before component families and tasks) is converted when
    ``upgrade`` (a run folder's own config), else rejected with the command that converts it.
    """
    from difflab.upgrade import is_legacy, upgrade_config

    if is_legacy(raw):
        if not upgrade:
            raise DifflabError(f"{source} uses the version-1 config layout (before [task] and "
                               "component families): convert it with `difflab upgrade FILE` "
                               "(it rewrites the file; --dry-run prints the result)")
        raw = upgrade_config(raw)
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        problems = "; ".join(_describe(err) for err in e.errors())
        raise DifflabError(f"invalid {source}: {problems}") from None


def _describe(err: dict[str, Any]) -> str:
    loc = [str(p) for p in err["loc"]]
    dotted = ".".join(loc)
    if err["type"] == "extra_forbidden":
        model = _model_at(loc[:-1])
        accepted = list(model.model_fields) if model is not None else []
        what = "allowed sections" if len(loc) == 1 else f"allowed keys of [{'.'.join(loc[:-1])}]"
        return _unknown(dotted, loc[-1], accepted, what)
    msg = str(err["msg"]).removeprefix("Value error, ")
    if err["type"] == "value_error":
        return msg if not dotted or msg.startswith(loc[0]) else f"{dotted}: {msg}"
    return f"{dotted}={err.get('input')!r}: {msg}"


def _model_at(loc: list[str]) -> type[BaseModel] | None:
    model: type[BaseModel] | None = Config
    for name in loc:
        field = model.model_fields.get(name) if model is not None else None
        ann = getattr(field, "annotation", None)
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    return model


def read_toml(path: str | os.PathLike) -> dict[str, Any]:
    """A TOML file as a raw dict (errors name the file)."""
    p = Path(path)
    if not p.is_file():
        raise DifflabError(f"config file {p} does not exist")
    try:
        return tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as e:
        raise DifflabError(f"config file {p} is not valid TOML: {e}") from None


def load_config(path: str | os.PathLike | None, overrides: list[str] | tuple[str, ...] = (),
                upgrade: bool = False) -> Config:
    """Read a TOML config (None: all defaults), apply ``--set`` overrides, validate
    (``upgrade``: convert a version-1 file in memory, as for a run folder's own config)."""
    raw: dict[str, Any] = {}
    source = "config"
    if path is not None:
        raw = read_toml(path)
        source = f"config {path}"
    if upgrade:
        from difflab.upgrade import is_legacy, upgrade_config

        if is_legacy(raw):
            raw = upgrade_config(raw)
    return config_from_dict(apply_overrides(raw, overrides), source)


def config_to_toml(cfg: Config) -> str:
    """The resolved config as TOML (None values, which TOML cannot hold, are left out)."""
    return tomli_w.dumps(cfg.model_dump(mode="json", exclude_none=True))


def save_config(cfg: Config, path: str | os.PathLike) -> Path:
    """Write ``config_to_toml(cfg)`` atomically (temporary name, then ``os.replace``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(config_to_toml(cfg))
    os.replace(tmp, path)
    return path


def upgrade_file(path: str | os.PathLike, dry_run: bool = False) -> tuple[Path, str]:
    """Convert a config file or a run folder's ``config.toml`` in place (atomically; the old
    file kept as ``<name>.v1``). Returns ``(file, new TOML)``."""
    from difflab.upgrade import is_legacy, upgrade_config

    p = Path(path)
    file = p / "config.toml" if p.is_dir() else p
    if not file.is_file():
        raise DifflabError(f"{p} is neither a config file nor a run folder with config.toml")
    raw = read_toml(file)
    if not is_legacy(raw):
        raise DifflabError(f"{file} already uses the version-2 layout: nothing to convert")
    new = upgrade_config(raw)
    config_from_dict(new, f"converted {file}")  # never write what will not load
    text = tomli_w.dumps(new)
    if not dry_run:
        backup = file.with_name(file.name + ".v1")
        if not backup.exists():
            backup.write_text(file.read_text())
        tmp = file.with_name(f".{file.name}.tmp-{os.getpid()}")
        tmp.write_text(text)
        os.replace(tmp, file)
    return file, text
