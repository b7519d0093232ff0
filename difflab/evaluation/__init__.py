"""Sample-quality evaluation: FID / KID / precision-recall / IS on features from extractors
that difflab trains itself (or Inception-v3 from local weights), always reported with the
real-versus-real floor and the sample counts; reports, plots and the ``eval`` / ``compare``
commands.

Quick start::

    from difflab.evaluation import RealReference, get_extractor

    ext = get_extractor("mnist-lenet", mnist_data, train=True)   # cached after the first time
    ref = RealReference(ext, real_images)
    print(ref.evaluate(samples)["fid"], ref.floor(len(samples))["fid"])
"""

from difflab.evaluation.evaluate import (
    FEATURE_METRICS,
    RealReference,
    check_image_sets,
    check_metrics,
    evaluate_features,
)
from difflab.evaluation.features import (
    DEFAULT_EXTRACTOR,
    EXTRACTORS,
    ExtractorNotTrainedError,
    ExtractorSpec,
    FeatureExtractor,
    cache_dir,
    extractor_for_dataset,
    get_extractor,
    train_extractor,
)
from difflab.evaluation.inception import MissingWeightsError, inception_weights_path
from difflab.evaluation.metrics import (
    PrecisionRecall,
    Score,
    fid_floor,
    fid_from_features,
    frechet_distance,
    gaussian_stats,
    inception_score,
    kid,
    mmd2_unbiased,
    precision_recall,
)
from difflab.evaluation.nets import TrainConfig
from difflab.evaluation.report import read_report, write_comparison, write_report

__all__ = [
    "DEFAULT_EXTRACTOR", "EXTRACTORS", "FEATURE_METRICS", "ExtractorNotTrainedError",
    "ExtractorSpec", "FeatureExtractor", "MissingWeightsError", "PrecisionRecall",
    "RealReference", "Score", "TrainConfig", "cache_dir", "check_image_sets", "check_metrics",
    "evaluate_features", "extractor_for_dataset", "fid_floor", "fid_from_features",
    "frechet_distance", "gaussian_stats", "get_extractor", "inception_score",
    "inception_weights_path", "kid", "mmd2_unbiased", "precision_recall", "read_report",
    "train_extractor", "write_comparison", "write_report",
]
