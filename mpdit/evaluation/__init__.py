"""Evaluation: the offline MNIST classifier metric and Inception FID (see docs/evaluation.md)."""

from mpdit.evaluation.classifier import (
    SmallCNN,
    accuracy,
    classifier_test_accuracy,
    default_classifier,
    load_classifier,
    predict,
    save_classifier,
    train_classifier,
)
from mpdit.evaluation.metrics import (
    FeatureStats,
    InceptionFeatures,
    classifier_metrics,
    compute_features,
    default_inception_weights,
    feature_stats,
    frechet_distance,
    inception_fid,
    real_data_baseline,
    reference_images,
)

__all__ = [
    "FeatureStats",
    "InceptionFeatures",
    "SmallCNN",
    "accuracy",
    "classifier_metrics",
    "classifier_test_accuracy",
    "compute_features",
    "default_classifier",
    "default_inception_weights",
    "feature_stats",
    "frechet_distance",
    "inception_fid",
    "load_classifier",
    "predict",
    "real_data_baseline",
    "reference_images",
    "save_classifier",
    "train_classifier",
]
