"""Metrics of generated images against real ones, always beside the real-versus-real floor.

The real images are split once into two disjoint halves: ``reference`` (what every generated
set is compared with) and ``holdout`` (a second real sample). The same metrics computed for
``holdout`` against ``reference`` are the *floor*: what a perfect generator would score at this
sample size (FID and KID are biased / noisy at finite ``n``, so 0 is not the target). The floor
is computed with as many holdout images as generated images, so the two are comparable.

Quick start::

    from difflab.evaluation import RealReference, get_extractor

    ext = get_extractor("mnist-lenet", data, train=True)
    ref = RealReference(ext, real_images, generator=torch.Generator().manual_seed(0))
    scores = ref.evaluate(fake_images, metrics=("fid", "kid", "pr"))
    floor = ref.floor(n=len(fake_images), metrics=("fid", "kid", "pr"))
    print(scores["fid"], floor["fid"])   # both print their sample counts
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from difflab.errors import DifflabError, bad_value
from difflab.evaluation.features import FeatureExtractor
from difflab.evaluation.metrics import (
    Score,
    fid_from_features,
    inception_score,
    kid,
    knn_radii,
    precision_recall,
    split_halves,
)

FEATURE_METRICS = ("fid", "kid", "pr", "is")
"""Metrics computed from extractor features / logits (``nll`` needs the model instead)."""


def check_metrics(metrics: Sequence[str], allowed: Sequence[str] = FEATURE_METRICS) -> list[str]:
    """Validate metric names (case-insensitive) and return them lower-cased, in order."""
    out = [m.strip().lower() for m in metrics]
    for m in out:
        if m not in allowed:
            raise bad_value("metric", m, f"one of {', '.join(allowed)}")
    return out


def check_image_sets(real: torch.Tensor | tuple, fake: torch.Tensor | tuple) -> None:
    """Raise unless real and generated images (or their ``(C, H, W)``) have the same shape."""
    r = tuple(real.shape[1:]) if isinstance(real, torch.Tensor) else tuple(real)
    f = tuple(fake.shape[1:]) if isinstance(fake, torch.Tensor) else tuple(fake)
    if r != f:
        raise DifflabError(
            f"real images are {r} but generated images are {f}: compare sets of the same "
            f"channels and resolution (evaluate against the dataset at the model's image_size)")


def evaluate_features(
    reference: torch.Tensor,
    fake: torch.Tensor,
    metrics: Sequence[str] = ("fid", "kid", "pr"),
    logits: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    k: int = 3,
    reference_radii: torch.Tensor | None = None,
) -> dict[str, Score]:
    """The requested metrics of ``fake`` features against ``reference`` features.

    Returns a dict with keys among ``fid``, ``kid``, ``precision``, ``recall``, ``is``
    (``pr`` gives both ``precision`` and ``recall``; ``is`` needs ``logits`` of the fake set;
    ``reference_radii`` are the reference's ``k``-NN radii when already known).
    """
    out: dict[str, Score] = {}
    for m in check_metrics(metrics):
        if m == "fid":
            out["fid"] = fid_from_features(reference, fake)
        elif m == "kid":
            out["kid"] = kid(reference, fake, kid_subsets, kid_subset_size, generator)
        elif m == "pr":
            pr = precision_recall(reference, fake, k, reference_radii)
            out["precision"], out["recall"] = pr.precision, pr.recall
        elif logits is not None:
            out["is"] = inception_score(logits, splits=min(10, logits.shape[0]))
        else:
            raise DifflabError("metric 'is' needs the extractor's logits of the generated set")
    return out


class RealReference:
    """Features of the real images, split once into ``reference`` and ``holdout`` halves.

    Args:
        extractor: the feature extractor.
        real_images: ``(N, C, H, W)`` real images in ``[-1, 1]``.
        generator: the random split (and KID subsets).
        progress: progress bar for the feature extraction.
    """

    def __init__(self, extractor: FeatureExtractor, real_images: torch.Tensor,
                 generator: torch.Generator | None = None, progress: bool = False) -> None:
        if real_images.shape[0] < 4:
            raise bad_value("len(real_images)", real_images.shape[0], ">= 4 real images")
        self.extractor = extractor
        self.image_shape = tuple(real_images.shape[1:])
        self.generator = generator
        feats = extractor.features(real_images, progress=progress)
        a, b = split_halves(feats.shape[0], generator)
        self.reference, self.holdout = feats[a], feats[b]
        self.holdout_images = real_images[b]
        self._radii: dict[int, torch.Tensor] = {}

    def _metric_kwargs(self, metrics: list[str], kwargs: dict) -> dict:
        """Add the reference's cached k-NN radii (computed once per ``k``) for ``pr``."""
        if "pr" in metrics:
            k = kwargs.get("k", 3)
            if k not in self._radii:
                self._radii[k] = knn_radii(self.reference, k)
            kwargs = {**kwargs, "reference_radii": self._radii[k]}
        return kwargs

    def evaluate(self, fake_images: torch.Tensor, metrics: Sequence[str] = ("fid", "kid", "pr"),
                 progress: bool = False, **kwargs) -> dict[str, Score]:
        """Metrics of generated images against the reference half (see
        :func:`evaluate_features` for ``kwargs``)."""
        check_image_sets(self.image_shape, fake_images)
        metrics = check_metrics(metrics)
        feats = self.extractor.features(fake_images, progress=progress)
        logits = (self.extractor.logits(fake_images, progress=progress) if "is" in metrics
                  else None)
        return evaluate_features(self.reference, feats, metrics, logits, self.generator,
                                 **self._metric_kwargs(metrics, kwargs))

    def floor(self, n: int | None = None, metrics: Sequence[str] = ("fid", "kid", "pr"),
              **kwargs) -> dict[str, Score]:
        """The same metrics for ``n`` held-out real images (default: all of that half): the
        real-versus-real floor at the generated sample size."""
        m = self.holdout.shape[0] if n is None else min(int(n), self.holdout.shape[0])
        metrics = check_metrics(metrics)
        logits = (self.extractor.logits(self.holdout_images[:m]) if "is" in metrics else None)
        out = evaluate_features(self.reference, self.holdout[:m], metrics, logits,
                                self.generator, **self._metric_kwargs(metrics, kwargs))
        return {k: Score(f"{v.name} floor", v.value, v.n_fake, v.n_real, v.std, v.stderr)
                for k, v in out.items()}
