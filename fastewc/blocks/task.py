"""What a block kind's merge reads (the state half of :mod:`fastewc.blocks`): a task's
estimates and anchors, the EWC's settings, and small helpers the kinds share."""
from typing import NamedTuple

import numpy as np
import tensorflow as tf


class Settings(NamedTuple):
    """What a merge reads of an EWC's configuration (Python values)."""
    mode: str          # "separate" or "online"
    gamma: float       # online decay γ
    kfac_sum: str      # "exact" or "nearest" (Kronecker terms, online)
    const: float       # the separate-mode constant c before the task


class Task(NamedTuple):
    """A validated task: per kind name its estimates ``{key: ...}``, the task's anchors
    θ_t per EWC key (float32) and the model's variables by key."""
    estimates: dict
    theta: dict
    by_key: dict
    anchors_given: bool


def shape_of(variable):
    return tuple(int(d) for d in variable.shape)


def all_finite(tensors):
    """Whether every entry of every tensor is finite (read as float32)."""
    return all(bool(tf.reduce_all(tf.math.is_finite(tf.cast(t, tf.float32)))) for t in tensors)


def float32_arrays(values):
    return tuple(np.asarray(v.numpy() if hasattr(v, "numpy") else v, np.float32) for v in values)
