"""sidetrain: train LoSA side networks (and probes) from a featcache store.

    from sidetrain import FitConfig, fit
    result = fit(FitConfig(cache="cache/demo", method="losa", rank=16))
"""

from .classifier import Classifier, build_classifier
from .endtoend import EndToEnd
from .loader import ShardLoader
from .losa import LoSA, LowRankMixer
from .train import FitConfig, FitResult, fit

__all__ = ["Classifier", "EndToEnd", "FitConfig", "FitResult", "LoSA", "LowRankMixer",
           "ShardLoader", "build_classifier", "fit"]
