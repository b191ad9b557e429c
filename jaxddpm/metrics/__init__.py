"""Sample-quality metrics: Frechet distance, the FID Inception network, reference statistics, and the
in-domain classifier score for the built-in datasets."""
from jaxddpm.metrics.frechet import (
  FeatureMoments,
  feature_statistics,
  frechet_distance,
  moments_init,
  moments_merge,
  moments_statistics,
  moments_update,
  trace_sqrt_product,
)
from jaxddpm.metrics.fid_stats import (
  Protocol,
  compute_statistics,
  load_or_compute_statistics,
  load_statistics,
  save_result,
  save_statistics,
)
from jaxddpm.metrics.inception import (
  FEATURE_DIM,
  InceptionV3,
  load_inception_variables,
  make_inception_feature_fn,
  preprocess as inception_preprocess,
)
from jaxddpm.metrics.classifier import (
  Classifier,
  classifier_accuracy,
  classifier_outputs,
  classifier_statistics,
  in_domain_score,
  load_classifier,
  load_or_train_classifier,
  save_classifier,
  train_classifier,
)
