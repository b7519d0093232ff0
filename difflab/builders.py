"""Builders: a validated :class:`~difflab.config.Config` in, library objects out (the dataset,
its held-out part, the path, the objective). Networks come from the component registry
(:mod:`difflab.components`) through the run's training task (:mod:`difflab.tasks`), which
also fills the fields the data decides.
"""

from __future__ import annotations

from difflab.config import Config, _path_constructors


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


def build_objective(cfg: Config):
    """The objective of ``[objective]``."""
    from difflab.objectives import build_objective as _build

    return _build(cfg.objective.name, **cfg.objective.options())

