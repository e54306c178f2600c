"""sidetrain: train LoSA side networks (and probes) from a featcache store.

    from sidetrain import FitConfig, fit
    result = fit(FitConfig(cache="cache/demo", method="losa", rank=16))
"""

from featcache.errors import UserError

from .classifier import Classifier, ModelSpec, build_classifier
from .endtoend import EndToEnd
from .loader import ShardLoader
from .losa import LoSA, LowRankMixer
from .run import Predictor, evaluate_run, load_predictor, predict
from .sweep import sweep
from .train import FitConfig, FitResult, fit, train_many

__all__ = ["Classifier", "EndToEnd", "FitConfig", "FitResult", "LoSA", "LowRankMixer",
           "ModelSpec", "Predictor", "ShardLoader", "build_classifier", "evaluate_run", "fit",
           "load_predictor", "predict", "UserError", "sweep", "train_many"]
