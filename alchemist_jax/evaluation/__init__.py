"""Measuring what the pipeline produces.

- `defects.py`: how well a rater's scores separate clean samples from injected defects (AUROC).
- `classifier.py`: the feature classifier trained on clean labelled images (cached), whose
  features and predictions stand in for Inception (FID) and CLIP (alignment).
- `generative.py`: evaluation of a trained text-to-image model on the clean test set: test
  loss at fixed draws, Fréchet classifier distance, text alignment, a sample grid
  (`alchemist-jax evaluate` calls `run`).
"""

from alchemist_jax.evaluation.defects import (auroc, credit_kept_copies, defect_auroc,
                                              normalize_within_groups)
from alchemist_jax.evaluation.classifier import (Classifier, UnlabeledDataError,
                                                 feature_classifier, load_test_data)
from alchemist_jax.evaluation.generative import (evaluate_model, fcd, frechet_distance,
                                                 generate, run, try_feature_classifier)

__all__ = ["Classifier", "UnlabeledDataError", "auroc", "credit_kept_copies", "defect_auroc", "evaluate_model", "fcd",
           "feature_classifier", "frechet_distance", "generate", "load_test_data",
           "normalize_within_groups", "run", "try_feature_classifier"]
