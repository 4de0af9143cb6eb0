"""Argument checks shared by the public entry points: one of each.

Every message follows the Keras 3 style: it names the argument, the constraint and the
value received, e.g. "`lam` must be >= 0. Received: lam=-1".
"""
import math
import numbers

import keras
import numpy as np
import tensorflow as tf


def check_one_of(name, value, allowed):
    if value not in allowed:
        choices = ", ".join(repr(a) for a in allowed)
        raise ValueError(f"`{name}` must be one of {choices}. Received: {name}={value!r}")
    return value


def check_positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"`{name}` must be a positive integer. Received: {name}={value!r}")
    return value


def check_seed(seed):
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**31:
        raise ValueError(f"`seed` must be None or an integer in [0, 2**31). Received: seed={seed!r}")
    return seed


def check_bool_or_none(name, value):
    """For ``jit_compile`` and friends: None (the measured default), True or False."""
    if value is not None and value is not True and value is not False:
        raise ValueError(f"`{name}` must be None, True or False. Received: {name}={value!r}")
    return value


def check_jit_compile(jit_compile):
    return check_bool_or_none("jit_compile", jit_compile)


_FLOAT32_MAX = float(np.finfo(np.float32).max)


def check_lam(lam, *, allow_tensor=False):
    """0 ≤ λ ≤ float32's largest value (the penalty is computed in float32: a larger λ is
    Inf there, and Inf · 0 gives a NaN penalty at the anchor), returned as a Python float.
    With ``allow_tensor`` a tensor or variable passes unchecked (reading it would cost a
    device-to-host sync inside a step)."""
    if allow_tensor and isinstance(lam, (tf.Tensor, tf.Variable, keras.Variable)):
        return lam
    if isinstance(lam, bool) or not isinstance(lam, numbers.Real) or not math.isfinite(lam):
        raise ValueError(f"`lam` must be a finite number >= 0. Received: lam={lam!r}")
    if lam < 0:
        raise ValueError(f"`lam` must be >= 0. Received: lam={lam!r}")
    if lam > _FLOAT32_MAX:
        raise ValueError(f"`lam` must be <= {_FLOAT32_MAX!r} (float32's largest value: the "
                         f"penalty is computed in float32). Received: lam={lam!r}")
    return float(lam)


def check_model(model, *, built=True, trainable=True, layer_ok=True, purpose="Fisher"):
    """``model`` is a Keras model (or layer, with ``layer_ok``), built when ``built``, and
    owns trainable variables when ``trainable``; returns it."""
    kinds = (keras.Model, keras.layers.Layer) if layer_ok else (keras.Model,)
    if not isinstance(model, kinds):
        raise TypeError(f"`model` must be a Keras model. Received: model of type {type(model).__name__}")
    if built and not model.built:
        raise ValueError(
            f"`model` '{model.name}' is not built: call it on a batch or build it with an "
            "input shape first. Received: an unbuilt model")
    if trainable and built and not model.trainable_variables:
        raise ValueError(f"`model` '{model.name}' has no trainable variables, so it has no "
                         f"{purpose}. Received: a model with 0 trainable variables")
    return model


def as_float32(value):
    """``value`` as a float32 tensor (no copy when it already is one)."""
    value = tf.convert_to_tensor(value)
    return value if value.dtype == tf.float32 else tf.cast(value, tf.float32)
