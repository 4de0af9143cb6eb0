"""EWC with ``model.compile`` / ``model.fit``: a wrapper model whose train step adds the
EWC gradient analytically.

    wrapped = fastewc.EWCModel(model, ewc)
    wrapped.compile(optimizer="adam", loss=..., metrics=[...], jit_compile=True,
                    steps_per_execution=10)
    wrapped.fit(x_b, y_b, epochs=3, callbacks=[...])

The wrapper shares ``model``'s layers and variables (training it trains ``model``); it only
replaces Keras' ``train_step``.  Per batch the update uses

    ∇(L_data + Σ model.losses)   (Keras' GradientTape, loss scaling, distribution)
    + λ·A·(θ − μ)                 (``ewc.penalty_and_gradients()``: analytic, no tape)

exactly as :func:`fastewc.make_train_step` does (both add it with
:func:`fastewc._penalty_term.add_penalty`): under a ``LossScaleOptimizer`` (Keras wraps
the optimizer for a ``mixed_float16`` model) the penalty gradient is multiplied by the loss
scale like the data gradient, and under a ``tf.distribute`` strategy by 1/R (the replica
gradients are summed).  The logged ``loss`` is L_data + Σ model.losses + P at the
pre-update weights, the same quantity :func:`fastewc.make_train_step` returns;
``ewc_penalty`` logs P alone.  ``evaluate`` and ``predict`` are Keras' own (no penalty in the
evaluation loss).  Everything Keras compiles around ``train_step`` -- ``jit_compile``,
``steps_per_execution``, callbacks, distribution -- applies unchanged.

Save ``model`` itself (``wrapped.inner_model``) and the EWC state (``ewc.save``); the
wrapper holds no weights of its own.  A consolidation that only updates the state (the
usual case) needs no recompilation; one that starts tracking new variables (a grown model)
is detected at the next ``fit`` (the train function is rebuilt).
"""
import keras
import tensorflow as tf

from fastewc import _keras_compat as compat
from fastewc._checks import check_model
from fastewc._penalty_term import add_penalty, check_penalty_source, tracking_token, uses_float16

__all__ = ["EWCModel"]


class EWCModel(keras.Model):
    """A Keras model that trains ``model`` with the EWC penalty of ``ewc`` added.

    Args:
      model: the built Keras model to train (its variables are shared, not copied).
      ewc: a :class:`fastewc.EWC` built on ``model`` (any
        :class:`fastewc._penalty_term.PenaltySource`).
      name: the wrapper's name (default ``"ewc_" + model.name``).
    """

    def __init__(self, model, ewc, *, name=None, **kwargs):
        check_model(model, layer_ok=False, trainable=False)
        check_penalty_source(ewc, model, optional=False)
        if "dtype" not in kwargs and uses_float16(model):
            # so that compile() wraps the optimizer in a LossScaleOptimizer, as for `model`
            kwargs["dtype"] = "mixed_float16"
        super().__init__(name=name or f"ewc_{model.name}", **kwargs)
        self.inner_model = model
        object.__setattr__(self, "_ewc", ewc)   # not a Keras-tracked dependency
        self._penalty_tracker = keras.metrics.Mean(name="ewc_penalty")
        object.__setattr__(self, "_ewc_token", tracking_token(ewc))
        self.built = True

    @property
    def ewc(self):
        return self._ewc

    def call(self, inputs, training=None):
        return self.inner_model(inputs, training=training)

    def train_step(self, data):
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        with tf.name_scope("fastewc/train_step"):
            with tf.GradientTape() as tape:
                y_pred = self(x, training=True)
                # Keras' total loss: compiled losses + model.losses, already divided by R
                # under a strategy (scale_loss_for_distribution).
                loss = compat.compiled_loss(self, x, y, y_pred, sample_weight)
                scaled = self.optimizer.scale_loss(loss)
            variables = self.trainable_weights
            grads = tape.gradient(scaled, variables)
            replicas = tf.distribute.get_strategy().num_replicas_in_sync
            penalty, grads = add_penalty(self._ewc, grads, variables, optimizer=self.optimizer,
                                         replica_scale=tf.constant(1.0 / replicas))
            self.optimizer.apply(grads, variables)
            batch = tf.shape(next(t for t in tf.nest.flatten(x) if t is not None))[0]
            # Keras' tracker multiplies by R again (unscale_loss_for_distribution).
            compat.loss_tracker(self).update_state(
                compat.unscale_loss_for_distribution(loss + penalty / replicas),
                sample_weight=batch)
            self._penalty_tracker.update_state(penalty)
        return self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)

    def make_train_function(self, force=False):
        # Retrace when the EWC started tracking new variables (a consolidation of a grown
        # model); a consolidation that only updates the state needs no retrace.
        token = tracking_token(self._ewc)
        if token != self._ewc_token:
            object.__setattr__(self, "_ewc_token", token)
            force = True
        return super().make_train_function(force=force)

    def get_config(self):
        raise NotImplementedError(
            "EWCModel is a training wrapper and is not serialized: save its `inner_model` "
            "(model.save) and the EWC state (ewc.save) instead.")

