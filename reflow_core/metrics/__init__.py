"""Evaluation metrics, one pipeline: samples -> features -> statistics (once for the reference, cached) -> distances.

    reference.py     `Reference.score(x)`, the one quality interface; `FeatureExtractor` (`Identity` for the toy),
                     `FeatureStats` (the one cached format), `ToyReference`, `FrechetReference`, `PairedMetric`
    distances.py     sliced W2, energy distance, MMD (point clouds); Frechet distance from statistics
    digits.py        the digit classifier (trained once, cached) and its features, `DigitFeatures`
    inception.py     InceptionV3 through torch-fidelity, offline weights, `FIDReference`, `fid_torch_fidelity`
    kinds.py         `reference_for(ds, real, cache_url)`: the reference of each data kind
    sr.py            super-resolution, paired: PSNR (peak 2), ||A x_hat - y||, LPIPS (local weights), `sr_row`
    straightness.py  trajectory straightness through `solvers.euler` with a step callback

Time convention: t = 0 is data, t = 1 is noise (`reflow_core.paths`). Every metric returns a plain python float.
"""
from .digits import (DigitFeatureNet, DigitFeatures, digit_accuracy, digit_features, load_or_train_digit_classifier,
                     train_digit_classifier)
from .distances import energy_distance, feature_stats, frechet_distance, mmd_rbf, sliced_w2
from .inception import INCEPTION_URL, FIDReference, InceptionFeatures, fid_torch_fidelity, inception_cache_path
from .kinds import reference_for
from .reference import (FeatureExtractor, FeatureStats, FrechetReference, Identity, PairedMetric, Reference,
                        ToyReference, moments)
from .sr import PSNR, Consistency, consistency, psnr, sr_row
from .straightness import straightness

__all__ = [
    "DigitFeatureNet", "DigitFeatures", "FIDReference", "FeatureExtractor", "FeatureStats", "FrechetReference",
    "INCEPTION_URL", "Identity", "InceptionFeatures", "PairedMetric", "Reference", "ToyReference", "digit_accuracy",
    "PSNR", "Consistency", "consistency", "psnr", "sr_row",
    "digit_features", "energy_distance", "feature_stats", "fid_torch_fidelity", "frechet_distance",
    "inception_cache_path", "load_or_train_digit_classifier", "mmd_rbf", "moments", "reference_for", "sliced_w2",
    "straightness", "train_digit_classifier",
]
