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

exactly as :func:`fastewc.make_train_step` does: under a ``LossScaleOptimizer`` (Keras wraps
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
from keras.src.losses.loss import unscale_loss_for_distribution

from fastewc.train import _ewc_token, _uses_float16, add_penalty

__all__ = ["EWCModel"]


class EWCModel(keras.Model):
    """A Keras model that trains ``model`` with the EWC penalty of ``ewc`` added.

    Args:
      model: the built Keras model to train (its variables are shared, not copied).
      ewc: a :class:`fastewc.EWC` built on ``model``.
      name: the wrapper's name (default ``"ewc_" + model.name``).
    """

    def __init__(self, model, ewc, *, name=None, **kwargs):
        if not isinstance(model, keras.Model):
            raise TypeError(f"`model` must be a Keras model. Received: model of type {type(model).__name__}")
        if not model.built:
            raise ValueError(f"`model` '{model.name}' is not built: call it on a batch or build it "
                             "with an input shape first. Received: an unbuilt model")
        if not (hasattr(ewc, "penalty") and hasattr(ewc, "penalty_gradients")):
            raise TypeError("`ewc` must be a fastewc.EWC. "
                            f"Received: ewc of type {type(ewc).__name__}")
        ewc_model = getattr(ewc, "model", model)
        if ewc_model is not model and \
                [id(v) for v in ewc_model.trainable_variables] != [id(v) for v in model.trainable_variables]:
            raise ValueError(f"`ewc` was built on model '{ewc_model.name}', not on `model` "
                             f"'{model.name}'. Received: an EWC for another model")
        if "dtype" not in kwargs and _uses_float16(model):
            # so that compile() wraps the optimizer in a LossScaleOptimizer, as for `model`
            kwargs["dtype"] = "mixed_float16"
        super().__init__(name=name or f"ewc_{model.name}", **kwargs)
        self.inner_model = model
        object.__setattr__(self, "_ewc", ewc)   # not a Keras-tracked dependency
        self._penalty_tracker = keras.metrics.Mean(name="ewc_penalty")
        object.__setattr__(self, "_ewc_token", _ewc_token(ewc))
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
                loss = self._compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight,
                                          training=True)
                scaled = self.optimizer.scale_loss(loss)
            variables = self.trainable_weights
            grads = tape.gradient(scaled, variables)
            with tf.name_scope("ewc_penalty"):
                replicas = tf.distribute.get_strategy().num_replicas_in_sync
                scale = tf.cast(self.optimizer.scale_loss(tf.constant(1.0 / replicas)), tf.float32)
                ewc_variables = self._ewc_variables()

                def combine(grads, penalty_grads):
                    by_id = {id(v): p for v, p in zip(ewc_variables, penalty_grads)}
                    return [_plus(g, by_id.get(id(v)), scale, v) for g, v in zip(grads, variables)]

                penalty, grads = add_penalty(self._ewc, grads, combine)
            self.optimizer.apply(grads, variables)
            batch = tf.shape(next(t for t in tf.nest.flatten(x) if t is not None))[0]
            # Keras' tracker multiplies by R again (unscale_loss_for_distribution).
            self._loss_tracker.update_state(
                unscale_loss_for_distribution(loss + penalty / replicas),
                sample_weight=batch)
            self._penalty_tracker.update_state(penalty)
        return self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)

    def make_train_function(self, force=False):
        # Retrace when the EWC started tracking new variables (a consolidation of a grown
        # model); a consolidation that only updates the state needs no retrace.
        token = _ewc_token(self._ewc)
        if token != self._ewc_token:
            object.__setattr__(self, "_ewc_token", token)
            force = True
        return super().make_train_function(force=force)

    def _ewc_variables(self):
        model = getattr(self._ewc, "model", None) or self.inner_model
        return model.trainable_variables

    def get_config(self):
        raise NotImplementedError(
            "EWCModel is a training wrapper and is not serialized: save its `inner_model` "
            "(model.save) and the EWC state (ewc.save) instead.")


def _plus(g, p, scale, variable):
    if p is None:
        return g
    p = tf.cast(p * scale, variable.dtype if g is None else g.dtype)
    return p if g is None else g + p
