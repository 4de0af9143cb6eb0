"""EWC: the stateful shell over :mod:`fastewc.penalty` (state, consolidation, save/load).

    penalty(θ) = λ/2 · Σ_i A_i (θ_i − μ_i)² + λ/2 · c

* ``mode="separate"`` (Kirkpatrick et al. 2017): after tasks 1..T with Fisher F_t at the
  weights θ_t, A = Σ_t F_t, μ = Σ_t F_t θ_t / A and c = Σ_t Σ_i F_t,i θ_t,i² − A_i μ_i², so
  the penalty EQUALS the per-task sum Σ_t λ/2 Σ_i F_t,i (θ_i − θ_t,i)², constant included
  (see :func:`fastewc.penalty.merge_separate` for the stable update).
* ``mode="online"`` (Schwarz et al. 2018): A ← γ·A + F_new, μ ← θ_new, c = 0.

Memory: 2 float32 per penalized parameter (A and μ) plus a few scalars, for ANY number of
tasks — O(P), where the per-task form holds 2·T·P floats.  Time: one fused compiled pass
over the penalized variables for the value and the analytic gradient λ·A·(θ − μ).

Variables are tracked by path (``variable.path`` with the model's own name stripped, so a
model that is rebuilt under another auto-generated name still matches).  The tracked set
is the model's trainable variables, minus ``exclude``, when the state is created (at
construction, or at the first consolidation of an unbuilt model); variables that appear
later (a new task head) start with A = 0 (not penalized) and enter the state at the next
consolidation.  A tracked variable missing from the model, or with another shape, is an
error naming it.

The state lives in non-trainable tf.Variables (A, μ float32; c, λ, γ float64), so compiled
functions that call :meth:`EWC.penalty` are not retraced by a consolidation, and EWC is a
``tf.Module``: ``tf.train.Checkpoint(model=..., optimizer=..., ewc=ewc)`` saves and
restores it (state, λ, γ, mode, task count).  A compiled train step traced before a
consolidation that ADDED variables (a grown model) must be retraced to penalize them.
"""
import hashlib
import io
import json
import math
import numbers
import os
import tempfile
import zipfile

import keras
import numpy as np
import tensorflow as tf

from fastewc import penalty as penalty_lib
from fastewc._checks import check_one_of

MODES = ("separate", "online")
FORMAT = "fastewc.EWC"
FORMAT_VERSION = 1


# -- argument checks (Keras style: argument, constraint, received value) ----------------
def _check_lam(lam):
    if isinstance(lam, bool) or not isinstance(lam, numbers.Real) or not math.isfinite(lam):
        raise ValueError(f"`lam` must be a finite number >= 0. Received: lam={lam!r}")
    if lam < 0:
        raise ValueError(f"`lam` must be >= 0. Received: lam={lam!r}")
    return float(lam)


def _check_gamma(gamma, mode):
    if isinstance(gamma, bool) or not isinstance(gamma, numbers.Real) or not 0 <= gamma <= 1:
        raise ValueError(f"`gamma` must be a number in [0, 1]. Received: gamma={gamma!r}")
    if mode == "separate" and gamma != 1:
        raise ValueError(
            "`gamma` only applies to mode='online' (the decay of older tasks); with "
            f"mode='separate' leave it at 1.0. Received: gamma={gamma!r}")
    return float(gamma)


def _check_model(model):
    if not isinstance(model, (keras.Model, keras.layers.Layer)):
        raise TypeError(f"`model` must be a Keras model. Received: model of type {type(model).__name__}")
    return model


def _shape(variable):
    return tuple(int(d) for d in variable.shape)


class EWC(tf.Module):
    """Elastic Weight Consolidation state and fused penalty for a Keras model.

    Args:
      model: the Keras model whose weights are consolidated.
      lam: λ ≥ 0, the penalty strength (settable later: ``ewc.lam = 10.0``).
      mode: ``"separate"`` — one term per task, Σ_t λ/2 Σ_i F_t,i (θ_i − θ_t,i)²
        (Kirkpatrick et al. 2017), kept as ONE quadratic (A = Σ_t F_t, μ = Σ_t F_t θ_t / A);
        ``"online"`` — F ← γ·F + F_new, anchor ← latest weights (Schwarz et al. 2018).
      gamma: γ ∈ [0, 1], the online decay of older tasks (only with ``mode="online"``).
      exclude: variables never penalized: a list of variables or paths, or a predicate
        ``fn(variable) -> bool``.

    Memory: 2 float32 per penalized parameter for any number of tasks (``state_bytes``).

    Example::

        ewc = fastewc.EWC(model, lam=100.0)
        ewc.consolidate((x_a, y_a), loss="sparse_categorical_crossentropy")
        with tf.GradientTape() as tape:
            loss = loss_fn(y_b, model(x_b, training=True)) + ewc.penalty()
    """

    # Python-side references, not state: kept out of tf.Module's variable walk.
    _TF_MODULE_IGNORED_PROPERTIES = frozenset(
        tf.Module._TF_MODULE_IGNORED_PROPERTIES | {"_model", "_exclude", "_plan_cache"})

    def __init__(self, model, *, lam, mode="separate", gamma=1.0, exclude=None):
        super().__init__(name="ewc")
        check_one_of("mode", mode, MODES)
        lam = _check_lam(lam)
        gamma = _check_gamma(gamma, mode)
        object.__setattr__(self, "_model", _check_model(model))   # not a checkpoint dependency
        object.__setattr__(self, "_exclude", self._exclude_predicate(exclude))
        self._lam = tf.Variable(lam, dtype=tf.float64, trainable=False, name="lam")
        self._gamma = tf.Variable(gamma, dtype=tf.float64, trainable=False, name="gamma")
        self._mode_index = tf.Variable(MODES.index(mode), dtype=tf.int32, trainable=False, name="mode")
        self._num_tasks = tf.Variable(0, dtype=tf.int64, trainable=False, name="num_tasks")
        self._const = tf.Variable(0.0, dtype=tf.float64, trainable=False, name="const")
        self._fisher = {}   # key -> A (float32 tf.Variable); checkpointed by key
        self._anchor = {}   # key -> μ
        object.__setattr__(self, "_plan_cache", None)
        if model.built:
            self._track_new_variables()

    # -- configuration ---------------------------------------------------------------
    @property
    def model(self):
        """The model; assign a new one that contains the tracked variables (e.g. a
        functional model rebuilt with a new head on the same layers) to move the state."""
        return self._model

    @model.setter
    def model(self, model):
        _check_model(model)
        previous = self._model
        object.__setattr__(self, "_model", model)
        object.__setattr__(self, "_plan_cache", None)
        try:
            if model.built:
                self._check_tracked_present(self._model_variables_by_key())
        except ValueError:
            object.__setattr__(self, "_model", previous)
            raise

    @property
    def mode(self):
        return MODES[int(self._mode_index.numpy())]

    @property
    def lam(self):
        return float(self._lam.numpy())

    @lam.setter
    def lam(self, value):
        self._lam.assign(_check_lam(value))

    @property
    def gamma(self):
        return float(self._gamma.numpy())

    @property
    def num_tasks(self):
        """Number of consolidated tasks (an int; a tensor inside ``tf.function``)."""
        if tf.executing_eagerly():
            return int(self._num_tasks.numpy())
        return self._num_tasks.read_value()

    @property
    def tracked_paths(self):
        """The tracked variables' keys (paths relative to the model), in state order."""
        return list(self._fisher.keys())

    def state(self):
        """``{path: (A, μ)}``: copies of the per-variable state as float32 NumPy arrays."""
        return {k: (self._fisher[k].numpy(), self._anchor[k].numpy()) for k in self._fisher}

    @property
    def state_bytes(self):
        """Bytes of per-parameter state: 2 float32 (A, μ) per tracked parameter."""
        return sum(int(np.prod(v.shape)) * 4 * 2 for v in self._fisher.values())

    def __repr__(self):
        return (f"<fastewc.EWC mode={self.mode!r} lam={self.lam:g} gamma={self.gamma:g} "
                f"num_tasks={self.num_tasks} variables={len(self._fisher)}>")

    # -- variables -------------------------------------------------------------------
    def _key(self, variable):
        path = getattr(variable, "path", None) or variable.name
        prefix = self._model.name + "/"
        return path[len(prefix):] if path.startswith(prefix) else path

    def _exclude_predicate(self, exclude):
        if exclude is None:
            return lambda variable: False
        if callable(exclude) and not isinstance(exclude, (list, tuple, set)):
            return exclude
        if isinstance(exclude, (str, tf.Variable, keras.Variable)):
            exclude = [exclude]
        if not isinstance(exclude, (list, tuple, set)):
            raise ValueError(
                "`exclude` must be None, a list of variables or paths, or a predicate "
                f"fn(variable) -> bool. Received: exclude={exclude!r}")
        items = list(exclude)
        ids = {id(item) for item in items if not isinstance(item, str)}
        names = {item for item in items if isinstance(item, str)}
        for item in items:
            if not isinstance(item, (str, tf.Variable, keras.Variable)):
                raise ValueError(
                    "`exclude` entries must be variables or variable paths. Received: "
                    f"an entry {item!r} of type {type(item).__name__}")
        model = self._model
        if model.built:
            known = set()
            for v in model.variables:
                known |= {id(v), v.path, self._key(v)}
            unknown = [item if isinstance(item, str) else getattr(item, "path", item)
                       for item in items if (item if isinstance(item, str) else id(item)) not in known]
            if unknown:
                raise ValueError(
                    f"`exclude` names variables that model '{model.name}' does not have: "
                    f"{unknown}. Received: exclude={[getattr(i, 'path', i) for i in items]!r}")
        return lambda v: id(v) in ids or v.path in names or self._key(v) in names

    def _new_trainable_variables(self):
        """Trainable, not excluded, untracked variables of the model, in model order."""
        out, seen = [], set(self._fisher)
        for v in self._model.trainable_variables:
            key = self._key(v)
            if key in seen or self._exclude(v):
                continue
            seen.add(key)
            out.append(v)
        return out

    def _track_new_variables(self, initial=None):
        """Create zero state for every new trainable variable (or ``initial[key]``)."""
        initial = initial or {}
        created = False
        keys = [self._key(v) for v in self._model.trainable_variables]
        dupes = sorted({k for k in keys if keys.count(k) > 1})
        if dupes:
            raise ValueError(f"EWC tracks variables by path, but model '{self._model.name}' has "
                             f"several trainable variables with the same path: {dupes}")
        for v in self._new_trainable_variables():
            key, shape = self._key(v), _shape(v)
            a, mu = initial.get(key, (np.zeros(shape, np.float32), np.zeros(shape, np.float32)))
            with tf.init_scope():
                self._fisher[key] = tf.Variable(a, dtype=tf.float32, trainable=False, name="fisher")
                self._anchor[key] = tf.Variable(mu, dtype=tf.float32, trainable=False, name="anchor")
            created = True
        if created:
            object.__setattr__(self, "_plan_cache", None)

    def _model_variables_by_key(self):
        out = {}
        for v in self._model.variables:
            out.setdefault(self._key(v), v)
        return out

    def _check_tracked_present(self, by_key):
        """The model variable of each tracked key; a clear error for the first mismatch."""
        found = []
        for key, a in self._fisher.items():
            v = by_key.get(key)
            if v is None:
                raise ValueError(
                    f"EWC state tracks variable '{key}' (shape {_shape(a)}), but model "
                    f"'{self._model.name}' has no variable with that path. A consolidated "
                    "variable must stay in the model; to drop it, build a new EWC.")
            if _shape(v) != _shape(a):
                raise ValueError(
                    f"Variable '{v.path}' has shape {_shape(v)}, but the EWC state was "
                    f"consolidated for shape {_shape(a)}. A consolidated variable must keep its "
                    "shape; to change it, build a new EWC.")
            found.append(v)
        return found

    def _plan(self):
        """(penalized model variables, A list, μ list, {id: index}, trainable variables),
        cached until the model's variables or the tracked set change."""
        signature = (tuple(id(v) for v in self._model.variables),
                     tuple(id(v) for v in self._model.trainable_variables), len(self._fisher))
        cache = self._plan_cache
        if cache is not None and cache[0] == signature:
            return cache[1]
        if not self._model.built:
            plan = ([], [], [], {}, [])
        else:
            found = self._check_tracked_present(self._model_variables_by_key())
            position = {id(v): i for i, v in enumerate(found)}
            trainable = list(self._model.trainable_variables)
            plan = (found, list(self._fisher.values()), list(self._anchor.values()),
                    position, trainable)
        object.__setattr__(self, "_plan_cache", (signature, plan))
        return plan

    # -- the penalty -----------------------------------------------------------------
    def penalty_is_active(self):
        """A bool tensor: λ > 0 and at least one task consolidated.  When False the
        penalty and its gradient are exactly 0 (no state yet, or λ = 0), so a train step
        can skip them (``tf.cond``); works eagerly and inside ``tf.function``."""
        return tf.logical_and(self._lam > 0, self._num_tasks > 0)

    def _half_lam_const(self):
        return tf.cast(0.5 * self._lam * self._const, tf.float32)

    def _fused(self, inline=False):
        """(value, grads of the penalized variables, plan) from one fused pass."""
        plan = self._plan()
        variables, fisher, anchors = plan[:3]
        if not variables:
            return self._half_lam_const(), [], plan
        value, grads = penalty_lib.ewc_penalty_and_gradients(
            variables, fisher, anchors, tf.cast(self._lam, tf.float32),
            const=tf.cast(self._const, tf.float32), inline=inline)
        return value, grads, plan

    def penalty(self):
        """λ/2 Σ_i A_i (θ_i − μ_i)² + λc/2: a float32 scalar, differentiable w.r.t. the model's
        weights with the analytic gradient λ·A·(θ − μ) (``tf.custom_gradient``).

        Separate mode: equals Σ_t λ/2 Σ_i F_t,i (θ_i − θ_t,i)² exactly; online mode:
        λ/2 Σ_i F_i (θ_i − θ*_i)².  0 before the first consolidation.  Eager, inside
        ``tf.function`` and under ``jit_compile=True``; float32 under mixed precision.
        """
        return self._fused()[0]

    def penalty_and_gradients(self, *, inline=False):
        """``(penalty(), penalty_gradients())`` from ONE fused pass (the value is
        differentiable as in :meth:`penalty`).  ``inline=True`` traces the pass into the
        calling graph without the custom gradient: for train steps that add the gradients
        themselves (:func:`fastewc.penalty.ewc_penalty_and_gradients`)."""
        value, grads, plan = self._fused(inline=inline)
        return value, self._align(grads, plan[3], plan[4])

    def penalty_gradients(self):
        """λ·A·(θ − μ) for each of ``model.trainable_variables`` (float32; zeros for variables
        not penalized), computed without a tape: add them to a train step's gradients."""
        variables, fisher, anchors, position, trainable = self._plan()
        if not variables:
            return [tf.zeros(v.shape, tf.float32) for v in trainable]
        grads = penalty_lib.ewc_penalty_gradients(variables, fisher, anchors,
                                                  tf.cast(self._lam, tf.float32))
        return self._align(grads, position, trainable)

    @staticmethod
    def _align(grads, position, trainable):
        out = []
        for v in trainable:
            i = position.get(id(v))
            out.append(grads[i] if i is not None else tf.zeros(v.shape, tf.float32))
        return out

    # -- consolidation ---------------------------------------------------------------
    def consolidate(self, data, *, loss, kind="exact", method="auto", batch_size=256,
                    **fisher_kwargs):
        """Consolidate the task ``data``: its diagonal Fisher at the current weights
        (:func:`fastewc.fisher_diagonal`, with ``loss``, ``kind``, ``method``, ``batch_size``
        and ``fisher_kwargs`` such as ``num_samples``, ``seed``, ``jit_compile``), then the
        current weights become this task's anchor (see :meth:`add_task`).

        All or nothing: the Fisher and the new state are computed first and assigned at
        the end, so an error leaves the state unchanged.  Returns the Fisher (list aligned
        with ``model.trainable_variables``).
        """
        from fastewc.fisher import fisher_diagonal  # late import: fisher is heavier

        self._require_eager("consolidate")
        if self._model.built:
            self._check_tracked_present(self._model_variables_by_key())
        fisher = fisher_diagonal(self._model, data, loss=loss, kind=kind, method=method,
                                 batch_size=batch_size, **fisher_kwargs)
        self.add_task(fisher)
        return fisher

    def add_task(self, fisher, anchors=None):
        """Absorb a task whose diagonal Fisher is already known.

        Args:
          fisher: list aligned with ``model.trainable_variables`` (as returned by
            :func:`fastewc.fisher_diagonal`), F ≥ 0 and finite.
          anchors: the task's weights θ_t, aligned the same way; None: the current weights.

        separate: (A, μ, c) ← merge_separate(A, μ, F, θ_t); online: (A, μ) ← (γA + F, θ_t).
        Tracked variables that are no longer trainable get F = 0.  All or nothing.
        """
        self._require_eager("add_task")
        model = self._model
        if not model.built:
            raise ValueError(f"`model` '{model.name}' is not built: call it on a batch first.")
        by_key = self._model_variables_by_key()
        self._check_tracked_present(by_key)
        trainable = list(model.trainable_variables)
        for label, values in (("fisher", fisher), ("anchors", anchors)):
            if (label == "fisher" or values is not None) and (
                    isinstance(values, (str, bytes)) or not hasattr(values, "__iter__")):
                raise TypeError(f"`{label}` must be a list of arrays or tensors, one per trainable "
                                f"variable. Received: {label} of type {type(values).__name__}")
        fisher = list(fisher)
        anchors = None if anchors is None else list(anchors)
        for label, values in (("fisher", fisher), ("anchors", anchors)):
            if values is None:
                continue
            if len(values) != len(trainable):
                raise ValueError(
                    f"`{label}` must have one entry per trainable variable of model "
                    f"'{model.name}' ({len(trainable)}). Received: {len(values)} entries")
            for v, t in zip(trainable, values):
                if not _is_real(t):
                    raise TypeError(f"`{label}` entry for variable '{v.path}' must be an array of "
                                    f"real numbers. Received: {type(t).__name__} of dtype "
                                    f"{getattr(t, 'dtype', None)}")
                if tuple(np.shape(t)) != _shape(v):
                    raise ValueError(f"`{label}` entry for variable '{v.path}' must have shape "
                                     f"{_shape(v)}. Received: shape {tuple(np.shape(t))}")
        new_fisher, new_theta = {}, {}
        for i, v in enumerate(trainable):
            key = self._key(v)
            new_fisher[key] = _as_float32(fisher[i])
            new_theta[key] = (penalty_lib.read_float32(v) if anchors is None
                              else _as_float32(anchors[i]))

        fresh = {self._key(v): v for v in self._new_trainable_variables()}
        keys = list(self._fisher) + [k for k in fresh if k not in self._fisher]
        olds, fs, thetas = [], [], []
        for key in keys:
            if key in self._fisher:
                olds.append((self._fisher[key].read_value(), self._anchor[key].read_value()))
            else:
                zeros = tf.zeros(_shape(fresh[key]), tf.float32)
                olds.append((zeros, zeros))
            if key in new_fisher:
                fs.append(new_fisher[key])
                thetas.append(new_theta[key])
            else:                                # tracked but frozen: no new information
                fs.append(tf.zeros(_shape(by_key[key]), tf.float32))
                thetas.append(penalty_lib.read_float32(by_key[key]))
        online = self.mode == "online"
        # One compiled pass over all variables, float64 inside; nothing is assigned yet.
        a_new, mu_new, delta_c, bad = _merge_all(
            [o[0] for o in olds], [o[1] for o in olds], fs, thetas,
            online, self._gamma.read_value())
        for key, (flag, bad_theta) in zip(keys, bad.numpy()):
            if bad_theta:
                where = ("`anchors` entry for variable" if anchors is not None and key in new_theta
                         else "The `model` weights of variable")
                raise ValueError(
                    f"{where} '{by_key[key].path}' must be finite to be a task's anchor. Received: "
                    "NaN or Inf values (did training diverge?)")
            if flag:
                f = new_fisher[key]
                raise ValueError(
                    f"`fisher`: the Fisher of variable '{by_key[key].path}' must be finite and >= 0. "
                    f"Received: values in [{float(tf.reduce_min(f))}, {float(tf.reduce_max(f))}]. "
                    "(Negative values come from a probability loss with from_logits=False on a "
                    "model whose output is not a softmax/sigmoid: pass from_logits=True for logits.)")

        # -- commit (rolled back if interrupted: the state is never half updated) -----
        pending = dict(zip(keys, zip(a_new, mu_new)))
        const, num_tasks = self._const.read_value(), self._num_tasks.read_value()
        try:
            self._track_new_variables(initial={k: pending[k] for k in fresh})
            for key, (a, mu) in pending.items():
                if key not in fresh:
                    self._fisher[key].assign(a)
                    self._anchor[key].assign(mu)
            if not online:
                self._const.assign_add(delta_c)
            self._num_tasks.assign_add(1)
        except BaseException:
            for key, (a, mu) in zip(keys, olds):
                if key in fresh:                  # `del`, not pop(): keeps them checkpointable
                    for table in (self._fisher, self._anchor):
                        if key in table:
                            del table[key]
                else:
                    self._fisher[key].assign(a)
                    self._anchor[key].assign(mu)
            self._const.assign(const)
            self._num_tasks.assign(num_tasks)
            object.__setattr__(self, "_plan_cache", None)
            raise

    @staticmethod
    def _require_eager(what):
        if not tf.executing_eagerly():
            raise RuntimeError(f"EWC.{what}() runs eagerly (it reads data and may create state); "
                               "call it outside tf.function.")

    # -- save / load -----------------------------------------------------------------
    def _header(self):
        return {
            "format": FORMAT, "version": FORMAT_VERSION, "mode": self.mode, "lam": self.lam,
            "gamma": self.gamma, "num_tasks": self.num_tasks,
            "const": float(self._const.numpy()),
            "variables": [{"path": k, "shape": list(_shape(a))} for k, a in self._fisher.items()],
            "excluded": (sorted(self._key(v) for v in self._model.variables if self._exclude(v))
                         if self._model.built else []),
        }

    def save(self, path):
        """Write the state to ``path`` (an .npz file), atomically.

        Stores mode, λ, γ, the task count, c, and for each tracked variable its path, shape,
        A and μ, plus a SHA-256 of it all.  The file is written to a temporary file in the
        same directory, flushed and fsync'ed, then renamed over ``path`` (``os.replace``):
        a reader sees the old file or the new one, never a partial one.
        """
        self._require_eager("save")
        path = os.fspath(path)
        header = self._header()
        arrays = {}
        for i, key in enumerate(self._fisher):
            arrays[f"fisher_{i}"] = self._fisher[key].numpy()
            arrays[f"anchor_{i}"] = self._anchor[key].numpy()
        header["sha256"] = _digest(header, arrays)
        header_bytes = np.frombuffer(json.dumps(header, sort_keys=True).encode("utf-8"), np.uint8)
        directory = os.path.dirname(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, header=header_bytes, **arrays)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        try:  # make the rename itself durable
            dir_fd = os.open(directory, os.O_RDONLY)
        except OSError:  # pragma: no cover - platforms without directory fds
            return
        try:
            os.fsync(dir_fd)
        except OSError:  # pragma: no cover
            pass
        finally:
            os.close(dir_fd)

    @classmethod
    def load(cls, path, model, *, exclude=None):
        """An EWC for ``model`` with the state saved at ``path`` by :meth:`save`.

        The file is read and verified (format, SHA-256, shapes) and matched against
        ``model`` (every saved path must exist with the saved shape) before anything is
        built: a mismatch raises a ValueError naming the first mismatching variable, a
        truncated or corrupted file raises a ValueError, and nothing is returned half
        loaded.  ``exclude`` defaults to the variables excluded when the file was saved.
        """
        header, arrays = _read_file(os.fspath(path))
        mode = header["mode"]
        try:
            check_one_of("mode", mode, MODES)
            lam = _check_lam(header["lam"])
            gamma = _check_gamma(header["gamma"], mode)
            num_tasks = int(header["num_tasks"])
            const = float(header["const"])
        except (ValueError, TypeError) as err:
            raise ValueError(f"EWC file {path!r} has an invalid header: {err}") from None
        _check_model(model)
        if not model.built:
            raise ValueError(f"`model` '{model.name}' is not built: build it before EWC.load.")
        if exclude is None:
            saved = set(header.get("excluded", []))
            exclude = lambda v, _saved=saved: v.path in _saved or _relative(model, v) in _saved  # noqa: E731
        ewc = cls(model, lam=lam, mode=mode, gamma=gamma, exclude=exclude)
        by_key = ewc._model_variables_by_key()
        state = {}
        for i, entry in enumerate(header["variables"]):
            key, shape = entry["path"], tuple(entry["shape"])
            v = by_key.get(key)
            if v is None:
                raise ValueError(
                    f"Cannot load EWC state from {path!r} onto model '{model.name}': the file "
                    f"has variable '{key}' (shape {shape}), which the model does not have.")
            if _shape(v) != shape:
                raise ValueError(
                    f"Cannot load EWC state from {path!r} onto model '{model.name}': variable "
                    f"'{v.path}' has shape {_shape(v)}, the file has shape {shape} for it.")
            if ewc._exclude(v):
                raise ValueError(f"Variable '{v.path}' has EWC state in {path!r} but is excluded.")
            state[key] = (arrays[f"fisher_{i}"], arrays[f"anchor_{i}"])
        # Build: ewc tracks the model's current trainable variables with zero state; add
        # the saved ones (some may no longer be trainable) and assign the values.
        for key, (a, mu) in state.items():
            if key in ewc._fisher:
                ewc._fisher[key].assign(a)
                ewc._anchor[key].assign(mu)
            else:
                ewc._fisher[key] = tf.Variable(a, dtype=tf.float32, trainable=False, name="fisher")
                ewc._anchor[key] = tf.Variable(mu, dtype=tf.float32, trainable=False, name="anchor")
        object.__setattr__(ewc, "_plan_cache", None)
        ewc._num_tasks.assign(num_tasks)
        ewc._const.assign(const)
        return ewc


def _as_float32(value):
    value = tf.convert_to_tensor(value)
    return value if value.dtype == tf.float32 else tf.cast(value, tf.float32)


def _is_real(value):
    """Whether ``value`` is an array/tensor of real numbers (float, int or bool)."""
    dtype = getattr(value, "dtype", None)
    try:
        dtype = tf.as_dtype(dtype if dtype is not None else np.asarray(value).dtype)
    except (TypeError, ValueError):
        return False
    return dtype.is_floating or dtype.is_integer or dtype.is_bool


@tf.function(autograph=False, jit_compile=False)
def _merge_all(fisher_sums, means, fishers, thetas, online, gamma):
    """Every variable's merge (:mod:`fastewc.penalty`) in one compiled pass, float64 inside.

    Not XLA: the merge runs once per task, and XLA's compile (≈ 3 s measured in the demo)
    would cost more than the elementwise work it speeds up.

    Returns the float32 (A', μ') lists, the separate-mode constant's increment and, per
    variable, whether its new Fisher has a negative or non-finite value and whether its
    anchor θ has a non-finite value (shape (n, 2)).
    """
    a_out, mu_out, bad, dc = [], [], [], tf.constant(0.0, tf.float64)
    for a, mu, f, theta in zip(fisher_sums, means, fishers, thetas):
        bad.append(tf.stack([tf.reduce_any(tf.logical_not(tf.math.is_finite(f)) | (f < 0)),
                             tf.reduce_any(tf.logical_not(tf.math.is_finite(theta)))]))
        if online:   # a Python bool: one trace per mode
            a_new, mu_new = penalty_lib.merge_online(a, mu, f, theta, gamma)
        else:
            a_new, mu_new, dc_new = penalty_lib.merge_separate(a, mu, f, theta)
            dc += dc_new
        a_out.append(tf.cast(a_new, tf.float32))
        mu_out.append(tf.cast(mu_new, tf.float32))
    return a_out, mu_out, dc, tf.stack(bad) if bad else tf.zeros([0, 2], tf.bool)


def _relative(model, variable):
    prefix = model.name + "/"
    return variable.path[len(prefix):] if variable.path.startswith(prefix) else variable.path


def _digest(header, arrays):
    """SHA-256 over the header (without its digest) and every array's bytes, in order."""
    body = {k: v for k, v in header.items() if k != "sha256"}
    h = hashlib.sha256(json.dumps(body, sort_keys=True).encode("utf-8"))
    for name in sorted(arrays, key=_array_order):
        arr = np.ascontiguousarray(arrays[name], dtype="<f4")
        h.update(name.encode("utf-8"))
        h.update(arr.tobytes())
    return h.hexdigest()


def _array_order(name):
    kind, _, index = name.rpartition("_")
    return (int(index), kind)


def _read_file(path):
    """(header, arrays) from an EWC file, verified; ValueError for anything malformed."""
    with open(path, "rb") as f:
        raw = f.read()

    def corrupt(reason):
        return ValueError(f"{path!r} is not a valid fastewc EWC file (truncated or corrupted?): {reason}")

    try:
        with np.load(io.BytesIO(raw), allow_pickle=False) as npz:
            contents = {name: npz[name] for name in npz.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as err:
        raise corrupt(f"{type(err).__name__}: {err}") from None
    if "header" not in contents:
        raise corrupt("no header")
    try:
        header = json.loads(contents.pop("header").tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise corrupt(f"unreadable header ({err})") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise corrupt(f"format is not {FORMAT!r}")
    if header.get("version") != FORMAT_VERSION:
        raise ValueError(f"{path!r} has EWC file version {header.get('version')!r}; this fastewc "
                         f"reads version {FORMAT_VERSION}.")
    required = ("mode", "lam", "gamma", "num_tasks", "const", "variables", "sha256")
    missing = [k for k in required if k not in header]
    if missing:
        raise corrupt(f"header lacks {missing}")
    try:
        entries = [(str(e["path"]), tuple(int(d) for d in e["shape"])) for e in header["variables"]]
    except (TypeError, KeyError, ValueError) as err:
        raise corrupt(f"bad variable list ({err})") from None
    expected = {f"{kind}_{i}" for i in range(len(entries)) for kind in ("fisher", "anchor")}
    if set(contents) != expected:
        raise corrupt(f"arrays {sorted(set(contents) ^ expected)} missing or unexpected")
    for i, (key, shape) in enumerate(entries):
        for kind in ("fisher", "anchor"):
            arr = contents[f"{kind}_{i}"]
            if arr.dtype != np.float32 or arr.shape != shape:
                raise corrupt(f"array for '{key}' has {arr.dtype} {arr.shape}, expected float32 {shape}")
    if _digest(header, contents) != header["sha256"]:
        raise corrupt("SHA-256 checksum mismatch")
    return header, contents
