"""fastewc: fast, exact Elastic Weight Consolidation for TensorFlow 2 / Keras 3."""
try:
    import tensorflow as _tf  # noqa: F401
    import keras as _keras  # noqa: F401
except ImportError as _err:  # pragma: no cover - exercised in a subprocess test
    raise ImportError(
        "fastewc needs TensorFlow 2 with Keras 3, which is not installed. Install one of: "
        "pip install 'fastewc[tf-cpu]' (CPU only), 'fastewc[tf]' or 'fastewc[cuda]' (GPU). "
        f"Original error: {_err}") from _err

from fastewc import rules as _rules  # noqa: F401  (registers the built-in rules)
from fastewc.fisher import fisher_diagonal, kfac_fisher
from fastewc.curvature import KroneckerBlock, KroneckerFisher
from fastewc.estimator import FisherEstimator
from fastewc.registry import RuleOutput, Rules, default_rules, register_rule, unregister_rule
from fastewc.ewc import EWC
from fastewc.penalty import (ewc_penalty, ewc_penalty_and_gradients, ewc_penalty_gradients,
                             merge_online, merge_separate)
from fastewc.train import TrainStep, make_train_step
from fastewc.keras_fit import EWCModel
from fastewc.likelihood import max_exact_cotangents, set_max_exact_cotangents

__version__ = "0.1.0"
__all__ = ["fisher_diagonal", "kfac_fisher", "KroneckerFisher", "KroneckerBlock", "FisherEstimator", "Rules", "RuleOutput", "default_rules",
           "register_rule", "unregister_rule",
           "EWC", "ewc_penalty", "ewc_penalty_gradients", "ewc_penalty_and_gradients",
           "merge_separate", "merge_online",
           "make_train_step", "TrainStep", "EWCModel", "max_exact_cotangents", "set_max_exact_cotangents"]
