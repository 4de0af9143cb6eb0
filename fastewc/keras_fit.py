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
``ewc_penalty`` logs P alone.  Everything Keras compiles around ``train_step`` --
``jit_compile``, ``steps_per_execution``, callbacks, distribution -- applies unchanged.

Threads: each call of the train function (one batch, or ``steps_per_execution`` batches)
holds the EWC's ``state_guard`` shared, so a consolidation in another thread commits
between calls, never during one (see :mod:`fastewc.train`).

``evaluate`` (and ``fit``'s validation) keeps Keras' evaluation loss, L_data + Σ
model.losses, without P: it measures the data, and P does not depend on it.  Keras counts
``model.losses`` (weight regularizers) in that loss; P is left out because it is logged
next to it -- ``ewc_penalty`` (``val_ewc_penalty``) is P at the evaluated weights, the value
``ewc.penalty()`` returns -- so the trained objective is ``loss + ewc_penalty``, and the
data loss is not hidden under a penalty that grows with λ.  ``predict`` is Keras' own.

``wrapped.save(path)`` (also what ``keras.callbacks.ModelCheckpoint(path)`` calls) saves what
training changes: ``inner_model`` to ``path`` (``.keras`` or ``.h5``; reload it with
``keras.models.load_model``) and the EWC state to ``path + ".ewc.npz"`` (``ewc.save``;
reload it with ``fastewc.EWC.load(path + ".ewc.npz", model)``).  Each file is replaced
atomically: the model is written to a temporary file in the same directory and renamed
over ``path`` only once both are written, so an error leaves the previous ``path`` whole.
The wrapper holds no weights of its own and is not serialized itself (``get_config``
raises); its optimizer state is not in the file (use ``tf.train.Checkpoint`` to resume
training).  A consolidation that only updates the state (the usual case) needs no
recompilation; one that starts tracking new variables (a grown model) is detected at the
next ``fit`` or ``evaluate`` (the train / test function is rebuilt).
"""
import os
import uuid

import keras
import tensorflow as tf

from fastewc import _keras_compat as compat
from fastewc import ewc_file
from fastewc._checks import check_model
from fastewc._penalty_term import (add_penalty, check_penalty_source, reading_state, tracking_token,
                                   uses_float16)

__all__ = ["EWCModel"]

EWC_SUFFIX = ".ewc.npz"     # EWCModel.save(path) writes the EWC state to path + EWC_SUFFIX


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
        # the EWC's tracked set each compiled function was made for (train / test)
        object.__setattr__(self, "_ewc_tokens",
                           dict.fromkeys(("train", "test"), tracking_token(ewc)))
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

    def test_step(self, data):
        # Keras' evaluation (its loss has no penalty: see the module docstring), with the
        # penalty at the evaluated weights in `ewc_penalty`, updated before Keras reads the
        # metrics.
        self._penalty_tracker.update_state(self._penalty_value())
        return super().test_step(data)

    def _penalty_value(self):
        """P at the current weights (float32), traced into the caller's graph."""
        ewc = self._ewc
        return tf.cond(ewc.penalty_is_active(),
                       lambda: tf.cast(ewc.penalty_and_gradients(inline=True)[0], tf.float32),
                       lambda: tf.constant(0.0))

    def _ewc_grew(self, kind):
        # A consolidation that started tracking new variables (a grown model) needs a
        # retrace; one that only updates the state does not.
        token = tracking_token(self._ewc)
        if token == self._ewc_tokens[kind]:
            return False
        self._ewc_tokens[kind] = token
        return True

    def make_train_function(self, force=False):
        super().make_train_function(force=self._ewc_grew("train") or force)
        function = self.train_function
        if function is not None and not getattr(function, "_fastewc_reads_state", False):
            ewc = self._ewc

            def train_function(*args, **kwargs):
                with reading_state(ewc):      # a consolidation's commit waits for the call
                    return function(*args, **kwargs)

            train_function._fastewc_reads_state = True
            self.train_function = train_function
        return self.train_function

    def make_test_function(self, force=False):
        return super().make_test_function(force=self._ewc_grew("test") or force)

    def save(self, filepath, overwrite=True, zipped=None, **kwargs):
        """Save ``inner_model`` to ``filepath`` and the EWC state to ``filepath + ".ewc.npz"``.

        Keras' ``Model.save`` arguments (``overwrite``, ``zipped``, ``include_optimizer``
        for ``.h5``).  The model is written to a temporary file next to ``filepath``, then
        the EWC state (atomically, :meth:`fastewc.EWC.save`), then the temporary file is
        renamed over ``filepath``: an error at any point leaves the previous ``filepath``
        whole.  ``zipped=False`` (a directory) is delegated to Keras as it is, not atomic.
        Reload with ``keras.models.load_model(filepath)`` and
        ``fastewc.EWC.load(filepath + ".ewc.npz", model)``.
        """
        path = os.fspath(filepath)
        if not isinstance(path, str) or path.startswith("hf://"):
            raise ValueError(
                "`filepath` must be a local path: EWCModel.save writes the model and its EWC "
                "state next to it. For the Hugging Face Hub save `inner_model` there and the "
                f"state with ewc.save. Received: filepath={filepath!r}")
        if zipped is False or not path.endswith((".keras", ".h5", ".hdf5")):
            # A directory, or an extension Keras refuses (with its own error, before any write).
            self.inner_model.save(path, overwrite=overwrite, zipped=zipped, **kwargs)
            self._ewc.save(path + EWC_SUFFIX)
            return
        if not overwrite and os.path.exists(path) and not _ask_to_overwrite(path):
            return
        directory = os.path.dirname(os.path.abspath(path))
        extension = os.path.splitext(path)[1]
        tmp = os.path.join(directory,
                           f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp{extension}")
        try:
            self.inner_model.save(tmp, overwrite=True, zipped=zipped, **kwargs)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            self._ewc.save(path + EWC_SUFFIX)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        ewc_file.fsync_directory(directory)

    def get_config(self):
        raise NotImplementedError(
            "EWCModel is a training wrapper and is not serialized: save its `inner_model` "
            "(model.save) and the EWC state (ewc.save) instead; EWCModel.save(path) does both.")


def _ask_to_overwrite(path):
    """Keras' prompt for ``save(..., overwrite=False)`` on an existing file."""
    answer = input(f"[WARNING] {path} already exists - overwrite? [y/n]").strip().lower()
    while answer not in ("y", "n"):
        answer = input('Enter "y" (overwrite) or "n" (cancel).').strip().lower()
    return answer == "y"

