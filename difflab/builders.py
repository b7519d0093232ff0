"""Builders: a validated :class:`~difflab.config.Config` in, library objects out (the dataset,
the path, the network of ``model.arch``, its denoiser or ``NoisyModel`` wrapper, the objective).
``resolve_data_fields`` / ``resolve_text_fields`` first fill the model fields that come from the
data (image size, channels, classes) and from the text encoder (context width).
"""

from __future__ import annotations

from difflab.config import UNET_OVERRIDES, Config, _path_constructors
from difflab.errors import DifflabError


def build_dataset(cfg: Config, split: str | None = None):
    """The dataset of ``[data]`` (``split`` overrides ``data.split``)."""
    from difflab.data import build_dataset as _build

    d = cfg.data
    return _build(d.name, root=d.root, image_size=d.image_size, split=split or d.split,
                  **d.options())


def build_held_out(cfg: Config):
    """The images of ``[data]`` the run never trained on, or None when there are none: the
    MNIST-family hold-out (``holdout_fraction`` > 0, ``held_out=True``), else for a
    ``split = "train"`` run its ``"test"`` split (a folder's or the digits' hold-out, CIFAR's or
    MNIST's official test files) when it exists."""
    from difflab.config import dataset_options
    from difflab.data import build_dataset as _build

    d = cfg.data
    opts = d.options()
    if "held_out" in dataset_options(d.name) and opts.get("holdout_fraction"):
        return _build(d.name, root=d.root, image_size=d.image_size, split=d.split,
                      **{**opts, "held_out": True})
    if d.split != "train":
        return None
    try:
        return _build(d.name, root=d.root, image_size=d.image_size, split="test", **opts)
    except (ValueError, FileNotFoundError):  # no hold-out configured, or no test files
        return None


def build_path(cfg: Config):
    """The :class:`~difflab.paths.GaussianPath` of ``[path]``."""
    return _path_constructors()[cfg.path.kind](**cfg.path.params())


def resolve_data_fields(cfg: Config, dataset) -> Config:
    """Fill ``model.image_size / in_channels / num_classes`` from a dataset; a value already set
    must agree with the dataset. Returns a new config."""
    m = cfg.model
    if m.class_cond and not dataset.num_classes:
        raise DifflabError(f"model.class_cond=true but dataset {cfg.data.name!r} has no labels: "
                           "set model.class_cond=false")
    if m.arch == "classifier" and not dataset.num_classes:
        raise DifflabError(f"model.arch='classifier' needs labels but dataset {cfg.data.name!r} "
                           "has none")
    labelled = m.class_cond or m.arch == "classifier"
    want = {"image_size": dataset.image_size, "in_channels": dataset.channels,
            "num_classes": dataset.num_classes if labelled else None}
    for key, value in want.items():
        given = getattr(m, key)
        if given is not None and given != value:
            raise DifflabError(f"model.{key}={given} does not match the data ({cfg.data.name!r} "
                               f"gives {value}): remove model.{key} or change [data]")
    model = m.model_copy(update=want)
    return cfg.model_copy(update={"model": model})


def unet_config(cfg: Config):
    """The :class:`~difflab.networks.UNetConfig` of a config whose data fields are resolved."""
    from difflab.networks import UNetConfig
    from difflab.networks.unet import PRESETS

    m = cfg.model
    if m.image_size is None or m.in_channels is None:
        raise DifflabError("model.image_size / model.in_channels are unset: resolve them from the "
                           "dataset first (difflab.builders.resolve_data_fields)")
    over = {k: getattr(m, k) for k in UNET_OVERRIDES if getattr(m, k) is not None}
    for k in ("channel_mult", "attention_resolutions"):
        if k in over:
            over[k] = tuple(over[k])
    if "attention_resolutions" not in over:
        base = PRESETS[m.preset]
        mult = over.get("channel_mult", base.channel_mult)
        sizes = [m.image_size // 2**i for i in range(len(mult))]
        scaled = [r * m.image_size // base.image_size for r in base.attention_resolutions]
        over["attention_resolutions"] = tuple(r for r in scaled if r in sizes)
    return UNetConfig.preset(m.preset, image_size=m.image_size, in_channels=m.in_channels,
                             out_channels=m.in_channels, num_classes=m.num_classes,
                             learn_sigma=m.learned_variance, **over)


def text_dim(cfg: Config) -> int | None:
    """Width of the text encoder's embeddings (None without one); loads the encoder's config."""
    if not cfg.model.text_encoder:
        return None
    from difflab.networks.text import load_text_encoder

    return load_text_encoder(cfg.model.text_encoder, cfg.model.text_max_length).dim


def resolve_text_fields(cfg: Config) -> Config:
    """Fill ``model.context_dim`` of a text-conditional U-Net from its text encoder."""
    m = cfg.model
    if m.arch != "unet" or not m.text_encoder:
        return cfg
    dim = text_dim(cfg)
    if m.context_dim is not None and m.context_dim != dim:
        raise DifflabError(f"model.context_dim={m.context_dim} does not match the text encoder "
                           f"{m.text_encoder!r} (width {dim}): remove model.context_dim")
    return cfg.model_copy(update={"model": m.model_copy(update={"context_dim": dim})})


def _family_config(cfg: Config, config_cls, **fixed):
    """A classifier / alignment network config: preset, then the ``[model]`` keys it has."""
    import dataclasses

    m = cfg.model
    names = {f.name for f in dataclasses.fields(config_cls)}
    over = {k: getattr(m, k) for k in (*UNET_OVERRIDES, "embed_dim")
            if getattr(m, k) is not None}
    bad = sorted(k for k in over if k not in names)
    if bad:
        raise DifflabError(f"model.{bad[0]} is not a setting of arch={m.arch!r}: its settings "
                           f"are {', '.join(sorted(names - set(fixed)))}")
    for k in ("channel_mult", "attention_resolutions"):
        if k in over:
            over[k] = tuple(over[k])
    return config_cls.preset(m.preset, **fixed, **over)


def build_model(cfg: Config, dataset=None):
    """The network of ``[model]``; with ``dataset`` its data fields are resolved first."""
    if dataset is not None:
        cfg = resolve_data_fields(cfg, dataset)
    m = cfg.model
    if m.arch == "classifier":
        from difflab.networks.classifier import ClassifierConfig, NoisyClassifier

        return NoisyClassifier(_family_config(cfg, ClassifierConfig, image_size=m.image_size,
                                              in_channels=m.in_channels,
                                              num_classes=m.num_classes))
    if m.arch == "alignment":
        from difflab.networks.alignment import AlignmentConfig, AlignmentModel

        return AlignmentModel(_family_config(cfg, AlignmentConfig, image_size=m.image_size,
                                             in_channels=m.in_channels, text_dim=text_dim(cfg)))
    from difflab.networks import UNet

    return UNet(unet_config(resolve_text_fields(cfg)))


def build_denoiser(cfg: Config, net, path, check_finite: bool = True):
    """Wrap ``net`` as a :class:`~difflab.Denoiser` with the prediction / precond of ``[model]``
    (a classifier or alignment network: as a :class:`~difflab.networks.noisy.NoisyModel`)."""
    from difflab.denoiser import Denoiser, EDMPrecond

    m = cfg.model
    if m.arch != "unet":
        from difflab.networks.noisy import NoisyModel

        return NoisyModel(net, path)
    precond = EDMPrecond(m.sigma_data) if m.precond == "edm" else None
    return Denoiser(net, path, prediction=m.prediction, precond=precond,
                    learned_variance=m.learned_variance, check_finite=check_finite)


def build_objective(cfg: Config):
    """The objective of ``[objective]``."""
    from difflab.objectives import build_objective as _build

    return _build(cfg.objective.name, **cfg.objective.options())

