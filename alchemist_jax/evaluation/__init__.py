"""Measuring what the pipeline produces.

- `defects.py`: how well a rater's scores separate clean samples from injected defects (AUROC).
- `classifier.py`: the feature classifier trained on clean labelled images (cached), whose
  features and predictions stand in for Inception (FID) and CLIP (alignment).
- `generative.py`: evaluation of a trained text-to-image model on the clean test set: test
  loss at fixed draws, Fréchet classifier distance, text alignment, a sample grid
  (`alchemist-jax evaluate` calls `run`).

Import the module you need; this package file imports nothing, so that the light `defects`
does not pull in the models and training of `generative`.
"""
