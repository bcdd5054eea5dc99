"""The reference each data kind is evaluated against: `reference_for`, the one call an evaluation makes.

Toy 2-D clouds: the points themselves, sliced W2 and energy distance (`ToyReference`); digits: the digit
classifier's features, `fd_digits` (`FrechetReference`); images: Inception through torch-fidelity, `fid`
(`FIDReference`). The caller scores every sample set with ``reference.score(x)`` and never asks which it got.
"""
from __future__ import annotations

import torch

from .. import storage
from ..data import DataSet
from .digits import DigitFeatures, load_or_train_digit_classifier
from .inception import FIDReference
from .reference import FrechetReference, Reference, ToyReference


def reference_for(ds: DataSet, real: torch.Tensor, cache_url: str, *,
                  inception_weights: str | None = None) -> Reference:
    """The `Reference` of ``ds``'s kind built from the real samples ``real``, its side computed once; ``cache_url``
    (a run root's ``_cache``) keeps the reference statistics and the digit classifier (trained on ``ds``)."""
    if ds.kind == "toy":
        return ToyReference(real, seed=0, cache_url=cache_url)
    if ds.name == "digits":
        net = load_or_train_digit_classifier(storage.join(cache_url, "digit_classifier.pt"), ds.x, ds.y)
        return FrechetReference("fd_digits", DigitFeatures(net), real, cache_url=cache_url)
    return FIDReference(real, inception_weights=inception_weights, cache_url=cache_url)
