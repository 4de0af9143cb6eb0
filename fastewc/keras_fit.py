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

Large models on CPU: as for :func:`fastewc.make_train_step`, start the process with
``TF_CPU_ALLOCATOR_USE_BFC=true`` so that each step's temporaries (the EWC's summed
gradient among them) are reused instead of page-faulted afresh every step.

``evaluate`` (and ``fit``'s validation) keeps Keras' evaluation loss, L_data + Σ
model.losses, without P: it measures the data, and P does not depend on it.  Keras counts
``model.losses`` (weight regularizers) in that loss; P is left out because it is logged
next to it -- ``ewc_penalty`` (``val_ewc_penalty``) is P at the evaluated weights, the value
``ewc.penalty()`` returns -- so the trained objective is ``loss + ewc_penalty``, and the
data loss is not hidden under a penalty that grows with λ.  ``predict`` is Keras' own.

Saving and resuming (``save``, ``save_weights``, ``keras.callbacks.ModelCheckpoint`` with
``save_weights_only`` True or False) keeps everything training needs: the model's weights,
the optimizer's state (Adam's moments, the step count) and the EWC state (the wrapper's
``save_own_variables`` adds it to Keras' weights store, one uint8 entry holding
:meth:`fastewc.EWC.save`'s verified file):

* ``wrapped.save("ckpt.keras")``: the wrapper itself (``inner_model``'s config, the
  compile config, weights, optimizer, EWC).  ``keras.models.load_model("ckpt.keras")``
  (after ``import fastewc``) returns a compiled :class:`EWCModel` that resumes where it
  stopped; its ``inner_model`` is the plain Keras model and its ``ewc`` the restored EWC.
  The file is written to a temporary file next to ``path`` and renamed over it: an error
  leaves the previous file whole.  ``.h5`` and ``zipped=False`` keep Keras' legacy /
  directory formats for ``inner_model`` alone with the EWC state in ``path + ".ewc.npz"``
  (no optimizer state).
* ``wrapped.save_weights("ckpt.weights.h5")``: weights, optimizer and EWC state in the one
  file (atomically, as above).  ``wrapped.load_weights(...)`` on an :class:`EWCModel` built
  and compiled like the saved one (same layers, same optimizer class) restores all three
  in place: the EWC state is read and checked against ``inner_model`` before anything is
  assigned, then copied into ``wrapped.ewc`` (the same object), and the optimizer is built
  first if it was not, so that its saved state is loaded rather than skipped.

A consolidation that only updates the state (the usual case) needs no recompilation; one
that starts tracking new variables (a grown model, or a restore) is detected at the next
``fit`` or ``evaluate`` (the train / test function is rebuilt).
"""
import io
import os
import tempfile
import zipfile

import keras
import numpy as np
import tensorflow as tf

from fastewc import _keras_compat as compat
from fastewc import ewc_file
from fastewc._checks import check_model
from fastewc._penalty_term import (add_penalty, check_penalty_source, reading_state, tracking_token,
                                   uses_float16)

__all__ = ["EWCModel"]

EWC_SUFFIX = ".ewc.npz"     # save(path) in the .h5 / directory formats: the EWC state's file
EWC_KEY = "fastewc_ewc"     # the wrapper's entry in Keras' weights store: the EWC file's bytes


@keras.saving.register_keras_serializable(package="fastewc")
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

    # -- saving and resuming (module docstring) ------------------------------------------
    def save(self, filepath, overwrite=True, zipped=None, **kwargs):
        """Save the wrapper -- ``inner_model``, the compile config, the optimizer's state and
        the EWC state -- to ``filepath`` (``.keras``), atomically.

        Keras' ``Model.save`` arguments.  The file is written to a temporary file next to
        ``filepath`` and renamed over it only once complete: an error at any point leaves
        the previous ``filepath`` whole.  Reload with ``keras.models.load_model(filepath)``
        (an :class:`EWCModel`, compiled, ready to resume).  ``.h5`` (Keras' legacy format)
        and ``zipped=False`` (a directory) save ``inner_model`` alone, without the optimizer,
        and the EWC state to ``filepath + ".ewc.npz"`` (:meth:`fastewc.EWC.save`); neither
        is atomic as a pair.
        """
        path = _local_path(filepath)
        if zipped is False or path.endswith((".h5", ".hdf5")):
            self.inner_model.save(path, overwrite=overwrite, zipped=zipped, **kwargs)
            self._ewc.save(path + EWC_SUFFIX)
            return
        if not path.endswith(".keras"):
            # Keras' own error for the extension, before any write
            return keras.Model.save(self, path, overwrite=overwrite, zipped=zipped, **kwargs)
        if overwrite or not os.path.exists(path) or _ask_to_overwrite(path):
            ewc_file.replace_atomically(path, lambda tmp: keras.Model.save(
                self, tmp, overwrite=True, zipped=zipped, **kwargs), suffix=".keras")

    def save_weights(self, filepath, overwrite=True, max_shard_size=None):
        """Keras' ``save_weights`` (``.weights.h5``): the weights, the optimizer's state and
        the EWC state in one file, written atomically as :meth:`save` writes.  Sharded
        files (``max_shard_size``) are Keras' own, not atomic."""
        path = _local_path(filepath)
        if max_shard_size is not None or not path.endswith(".weights.h5"):
            return super().save_weights(path, overwrite=overwrite, max_shard_size=max_shard_size)
        if overwrite or not os.path.exists(path) or _ask_to_overwrite(path):
            ewc_file.replace_atomically(path, lambda tmp: keras.Model.save_weights(
                self, tmp, overwrite=True), suffix=".weights.h5")

    def load_weights(self, filepath, skip_mismatch=False, **kwargs):
        """Keras' ``load_weights`` plus the optimizer's and the EWC state saved by
        :meth:`save_weights` or :meth:`save`.

        The EWC state is read and checked against ``inner_model`` (paths, shapes, checksum)
        before any weight is assigned; it is then copied into ``self.ewc`` in place (the
        same object).  A file without EWC state (``inner_model``'s own weights) raises a
        ValueError.  A compiled wrapper's optimizer is built first if it is not, so that its
        saved state is loaded (Keras skips the state of an unbuilt optimizer)."""
        path = _local_path(filepath)
        stored = _stored_ewc(path)
        loaded = None if stored is None else self._ewc_from_bytes(stored, path)
        if getattr(self, "optimizer", None) is not None and not self.optimizer.built:
            self.optimizer.build(self.trainable_variables)
        object.__setattr__(self, "_ewc_read_first", loaded is not None)
        try:
            super().load_weights(path, skip_mismatch=skip_mismatch, **kwargs)
        finally:
            object.__setattr__(self, "_ewc_read_first", False)
        if loaded is not None:
            self._adopt_ewc(loaded)

    def save_own_variables(self, store):
        # The wrapper owns no variable (they are inner_model's, the optimizer's, the
        # metrics'): its entry is the EWC state.
        with tempfile.TemporaryDirectory() as directory:
            file = os.path.join(directory, "ewc.npz")
            self._ewc.save(file)
            with open(file, "rb") as f:
                store[EWC_KEY] = np.frombuffer(f.read(), np.uint8)

    def load_own_variables(self, store):
        if getattr(self, "_ewc_read_first", False):
            return                                  # load_weights read and checked it already
        if EWC_KEY not in store.keys():
            raise ValueError(
                f"The weights loaded into '{self.name}' hold no EWC state (saved by Keras for "
                "`inner_model`, not by EWCModel.save_weights / save): load them into "
                "`wrapped.inner_model` and the EWC state with fastewc.EWC.load.")
        self._adopt_ewc(self._ewc_from_bytes(np.asarray(store[EWC_KEY]).tobytes(), "the file"))

    def _ewc_from_bytes(self, data, source):
        """The EWC on ``inner_model`` that ``data`` (an EWC file's bytes) holds, checked."""
        from fastewc.ewc import EWC
        with tempfile.TemporaryDirectory() as directory:
            file = os.path.join(directory, "ewc.npz")
            with open(file, "wb") as f:
                f.write(data)
            try:
                return EWC.load(file, self.inner_model)
            except ValueError as err:
                raise ValueError(f"Cannot restore the EWC state of {source!r}: "
                                 f"{str(err).replace(repr(file), 'the file')}") from None

    def _adopt_ewc(self, loaded):
        """Make ``loaded``'s state this wrapper's EWC state: in place (through a
        ``tf.train.Checkpoint`` of it, so that ``self.ewc`` stays the user's object), or by
        replacing the placeholder :meth:`from_config` made.  The compiled functions are
        rebuilt at the next fit / evaluate (the tracked variables may differ)."""
        if getattr(self, "_ewc_placeholder", False):
            object.__setattr__(self, "_ewc", loaded)
            object.__setattr__(self, "_ewc_placeholder", False)
        else:
            with tempfile.TemporaryDirectory() as directory:
                prefix = os.path.join(directory, "ewc")
                tf.train.Checkpoint(ewc=loaded).write(prefix)
                tf.train.Checkpoint(ewc=self._ewc).read(prefix).assert_consumed()
        self._ewc_tokens.update(train=None, test=None)

    def get_config(self):
        return {"name": self.name,
                "inner_model": keras.saving.serialize_keras_object(self.inner_model)}

    @classmethod
    def from_config(cls, config, custom_objects=None):
        """The wrapper of ``keras.models.load_model``: ``inner_model`` from its config and a
        placeholder EWC, replaced by the saved one when Keras loads the weights."""
        from fastewc.ewc import EWC
        model = keras.saving.deserialize_keras_object(config["inner_model"],
                                                      custom_objects=custom_objects)
        wrapped = cls(model, EWC(model, lam=0.0), name=config.get("name"))
        object.__setattr__(wrapped, "_ewc_placeholder", True)
        return wrapped


def _local_path(filepath):
    path = os.fspath(filepath)
    if not isinstance(path, str) or "://" in path:
        raise ValueError(
            "`filepath` must be a local path: EWCModel writes its files atomically through a "
            "temporary file next to it. For the Hugging Face Hub or a bucket save locally and "
            f"upload. Received: filepath={filepath!r}")
    return path


def _stored_ewc(path):
    """The EWC bytes a ``.weights.h5`` or ``.keras`` file holds for the wrapper (Keras' H5
    layout: the root's entry ``vars/<EWC_KEY>``), b"" for such a file without them, None for
    another format (then ``load_own_variables`` reads them as Keras loads)."""
    import h5py
    if path.endswith(".weights.h5"):
        with h5py.File(path, "r") as f:
            return _h5_entry(f)
    if path.endswith(".keras") and zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            if "model.weights.h5" in archive.namelist():
                with h5py.File(io.BytesIO(archive.read("model.weights.h5")), "r") as f:
                    return _h5_entry(f)
    return None


def _h5_entry(f):
    entry = f.get(f"vars/{EWC_KEY}")
    if entry is None:
        raise ValueError(
            f"`filepath` holds no EWC state (weights saved by Keras for `inner_model`, not by "
            f"EWCModel.save_weights / save): load them into `wrapped.inner_model` and the EWC "
            f"state with fastewc.EWC.load. Received: filepath={f.filename!r}")
    return np.asarray(entry).tobytes()


def _ask_to_overwrite(path):
    """Keras' prompt for ``save(..., overwrite=False)`` on an existing file."""
    answer = input(f"[WARNING] {path} already exists - overwrite? [y/n]").strip().lower()
    while answer not in ("y", "n"):
        answer = input('Enter "y" (overwrite) or "n" (cancel).').strip().lower()
    return answer == "y"

