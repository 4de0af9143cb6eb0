"""EWC: the stateful shell over :mod:`fastewc.penalty` (variable tracking, the consolidation
transaction, save/load through :mod:`fastewc.ewc_file`).

    penalty(θ) = λ/2 · Σ_i A_i (θ_i − μ_i)² + λ/2 · c

* ``mode="separate"`` (Kirkpatrick et al. 2017): after tasks 1..T with Fisher F_t at the
  weights θ_t, A = Σ_t F_t, μ = Σ_t F_t θ_t / A and c = Σ_t Σ_i F_t,i θ_t,i² − A_i μ_i², so
  the penalty EQUALS the per-task sum Σ_t λ/2 Σ_i F_t,i (θ_i − θ_t,i)², constant included
  (see :func:`fastewc.penalty.merge_separate` for the stable update).
* ``mode="online"`` (Schwarz et al. 2018): A ← γ·A + F_new, μ ← θ_new, c = 0.

Memory: 2 float32 per penalized parameter (A and μ) plus a few scalars, for ANY number of
tasks — O(P), where the per-task form holds 2·T·P floats.  Time: O(P), one compiled
function over the penalized variables for the value and the analytic gradient λ·A·(θ − μ).

``curvature="kfac"`` (Ritter, Botev & Barber 2018) replaces the diagonal of each Dense and
convolution layer (kernel and bias) by a Kronecker-factored block A ⊗ G
(:func:`fastewc.kfac_fisher`); the other variables keep the diagonal quadratic above (the
block's own variables keep A = 0 there).  The blocks' terms, their merges (exact per-task
sums, or online with one nearest Kronecker product per layer: ``kfac_sum``) and their
penalty are :mod:`fastewc.kfac_penalty`'s; they live in :class:`fastewc._kfac_state.KroneckerState`
and add their value and gradient to the diagonal's (a second compiled function).

Variables are tracked by path (``variable.path`` with the model's own name stripped, so a
model that is rebuilt under another auto-generated name still matches).  The tracked set
is the model's trainable variables, minus ``exclude``, when the state is created (at
construction, or at the first consolidation of an unbuilt model); variables that appear
later (a new task head) start with A = 0 (not penalized) and enter the state at the next
consolidation.  A tracked variable missing from the model, or with another shape, is an
error naming it.

A task enters in three steps (:meth:`EWC.add_task`): validate (the arguments → the new
per-variable F and θ), merge (pure: :func:`fastewc.penalty.merge_all`, nothing assigned)
and commit (assign everything, or roll back: the state is never half updated).

The state lives in non-trainable tf.Variables (A, μ float32; c, λ, γ float64), so compiled
functions that call :meth:`EWC.penalty` are not retraced when a consolidation only updates
values, and EWC is a ``tf.Module``: ``tf.train.Checkpoint(model=..., optimizer=...,
ewc=ewc)`` saves and restores it (state, λ, γ, mode, task count, Kronecker terms).

A restore gives exactly the checkpoint's state, or raises and changes nothing.  Each EWC
tensor is checkpointed under the key a plain variable has, through a staging entry
(:mod:`fastewc._state_table`): the restore collects every value of the EWC first, then
:meth:`EWC._restore_checkpoint` checks them all against the model (each saved variable
exists with the saved shape, is not excluded, the model is built; each Kronecker block is
complete and shaped from its kernel), and only then assigns: A and μ of the saved keys,
zero state for tracked keys the checkpoint lacks (what a new EWC would hold), Kronecker
terms and blocks the checkpoint lacks dropped.  So a restore into an EWC that
consolidated more since drops that, a mismatching shape raises before any variable is
written, TF never defers EWC state onto a variable created later, and checkpoints written
before the staging entries (same keys) restore the same way.

A trace bakes in the penalty's structure (the tracked variables, the Kronecker terms).  A
consolidation or restore that changes it bumps a structure version (not checkpointed);
the trainers of :mod:`fastewc.train` and :mod:`fastewc.keras_fit` retrace on
:attr:`EWC.structure_token`, and a user's ``tf.function`` traced before raises on its next
call (NaN under XLA, which drops assertions) after a warning at the change: never a
silently partial penalty (:meth:`EWC._guarded_lam` says why not a structure traceable ahead).

Threads: one ``threading.RLock`` per EWC is held across every read-merge-write of the state
(:meth:`EWC.consolidate` -- its Fisher included --, :meth:`EWC.add_task`, :meth:`EWC.save`,
:meth:`EWC.state`, a checkpoint restore's commit, eager penalty reads), so
concurrent consolidations of one EWC are applied one after the other, each merged against
the state it commits over.  Compiled train steps do not take that lock; they hold the EWC's
``state_guard`` (a :class:`fastewc._rwlock.ReadersWriterLock`) shared around each compiled
call (:class:`fastewc.TrainStep`, :class:`fastewc.EWCModel`'s train function), and a
consolidation's commit -- the assignment of A, μ, c and the Kronecker terms -- holds it
exclusively: a commit waits for the running steps, and a step that starts during a commit
waits for it, so every step reads the whole state before or the whole state after a task,
never a mix.  The Fisher computation itself does not block training (it reads the weights
as they are while it runs).
"""
import contextlib
import numbers
import os
import threading
import warnings
from typing import NamedTuple

import keras
import numpy as np
import tensorflow as tf

from fastewc import _cache, ewc_file
from fastewc._rwlock import ReadersWriterLock
from fastewc._state_table import Restorer, StateTable as _StateTable
from fastewc import kfac_penalty, kronecker
from fastewc import penalty as penalty_lib
from fastewc._kfac_state import FIELDS, KroneckerState, block_shapes, parse_term_key
from fastewc.curvature import CURVATURES, KroneckerFisher
from fastewc.kfac_penalty import KFAC_SUMS
from fastewc._checks import as_float32, check_lam, check_model, check_one_of

MODES = ("separate", "online")
_ESTIMATORS = "_fastewc_fisher_estimators"
# The scalar state, checkpointed as ``ewc/<name>`` (the attribute names).
_SCALARS = ("_lam", "_gamma", "_mode_index", "_num_tasks", "_const", "_curvature_index",
            "_kfac_sum_index", "_damping")
_STALE_TRACE = (
    "fastewc.EWC: this tf.function traced the EWC penalty before a consolidation or a checkpoint "
    "restore changed the penalty's structure (new tracked variables, e.g. a new head, or new "
    "Kronecker terms with curvature='kfac'): the trace cannot see them. Trace it again: create "
    "the tf.function again after consolidating, or train with fastewc.make_train_step / "
    "fastewc.EWCModel, which retrace by themselves.")


def _check_gamma(gamma, mode):
    if isinstance(gamma, bool) or not isinstance(gamma, numbers.Real) or not 0 <= gamma <= 1:
        raise ValueError(f"`gamma` must be a number in [0, 1]. Received: gamma={gamma!r}")
    if mode == "separate" and gamma != 1:
        raise ValueError(
            "`gamma` only applies to mode='online' (the decay of older tasks); with "
            f"mode='separate' leave it at 1.0. Received: gamma={gamma!r}")
    return float(gamma)


def _check_kfac_options(curvature, damping, kfac_sum, mode):
    """Check ``curvature``, ``damping`` and ``kfac_sum`` together; returns damping."""
    check_one_of("curvature", curvature, CURVATURES)
    check_one_of("kfac_sum", kfac_sum, KFAC_SUMS)
    if not isinstance(damping, numbers.Real):
        raise ValueError(f"`damping` must be a finite number >= 0. Received: damping={damping!r}")
    damping = kronecker.check_damping(damping)
    if curvature == "diagonal" and (damping != 0 or kfac_sum != "exact"):
        what = f"damping={damping!r}" if damping != 0 else f"kfac_sum={kfac_sum!r}"
        raise ValueError(f"`damping` and `kfac_sum` apply to curvature='kfac' only. Received: "
                         f"{what} with curvature='diagonal'")
    if kfac_sum == "nearest" and mode == "separate":
        raise ValueError(
            "`kfac_sum`='nearest' applies to mode='online' only: separate-mode tasks keep their "
            "own anchors, and their Kronecker terms are summed exactly. Received: "
            "kfac_sum='nearest' with mode='separate'")
    return float(damping)


def _check_any_model(model):
    """A Keras model or layer, built or not (EWC tracks it once built)."""
    return check_model(model, built=False, trainable=False)


def _shape(variable):
    return tuple(int(d) for d in variable.shape)


def _relative_path(model, variable):
    """``variable.path`` without the leading ``model.name + "/"`` (EWC's key)."""
    path = getattr(variable, "path", None) or variable.name
    prefix = model.name + "/"
    return path[len(prefix):] if path.startswith(prefix) else path


class PenaltyPlan(NamedTuple):
    """What a penalty evaluation reads, resolved against the model's current variables."""
    variables: list   # the model variable of each tracked key, in state order
    fisher: list      # A of each, same order (tf.Variables)
    anchors: list     # μ of each, same order
    position: dict    # id(model variable) -> its index in `variables`
    trainable: list   # model.trainable_variables: the order gradients are returned in
    kronecker: list   # [(model variables of a block, its Kronecker terms)]


_NO_PLAN = PenaltyPlan([], [], [], {}, [], [])


class _Task(NamedTuple):
    """A validated task: its per-key F and θ (float32), and the model's variables by key."""
    fisher: dict
    theta: dict
    by_key: dict
    anchors_given: bool


class _Update(NamedTuple):
    """A merged task, not yet assigned: per key the old and the new (A, μ)."""
    keys: list
    old: list
    new: list
    delta_c: tf.Tensor
    fresh: set        # keys of variables that enter the state with this task


class EWC(tf.Module):
    """Elastic Weight Consolidation state and its penalty for a Keras model.

    Args:
      model: the Keras model whose weights are consolidated.
      lam: λ ≥ 0, the penalty strength (settable later: ``ewc.lam = 10.0``).
      mode: ``"separate"`` — one term per task, Σ_t λ/2 Σ_i F_t,i (θ_i − θ_t,i)²
        (Kirkpatrick et al. 2017), kept as ONE quadratic (A = Σ_t F_t, μ = Σ_t F_t θ_t / A);
        ``"online"`` — F ← γ·F + F_new, anchor ← latest weights (Schwarz et al. 2018).
      gamma: γ ∈ [0, 1], the online decay of older tasks (only with ``mode="online"``).
      exclude: variables never penalized: a list of variables or paths, or a predicate
        ``fn(variable) -> bool``.
      curvature: ``"diagonal"`` (the diagonal Fisher) or ``"kfac"``: Kronecker-factored
        blocks A ⊗ G for Dense and convolution layers (:func:`fastewc.kfac_fisher`), the
        diagonal for the other variables.
      damping: δ ≥ 0 (``"kfac"`` only), factored Tikhonov damping of every Kronecker term,
        (A + π√δ I) ⊗ (G + √δ/π I) (:func:`fastewc.kronecker.damped_factors`): a prior
        precision of about δ on the block's weights.  Default 0: the penalty is the
        Kronecker-factored Fisher itself; nothing is inverted, so it needs no damping to
        stay finite.  Settable later (``ewc.damping = 1e-3``).
      kfac_sum: how tasks add up in ``mode="online"`` (``"kfac"`` only): ``"exact"`` keeps a
        term per task (cost growing with the tasks), ``"nearest"`` one term per layer, the
        nearest Kronecker product to the decayed sum (:mod:`fastewc.kfac_penalty`).
        ``mode="separate"`` is always exact.

    Memory: 2 float32 per penalized parameter for any number of tasks (``state_bytes``);
    with ``curvature="kfac"`` each Kronecker term adds d'² + u² + d'u floats (d' = kernel
    rows + 1, u = units): one per task and layer, or one per layer with
    ``kfac_sum="nearest"``.

    Example::

        ewc = fastewc.EWC(model, lam=100.0)
        ewc.consolidate((x_a, y_a), loss="sparse_categorical_crossentropy")
        with tf.GradientTape() as tape:
            loss = loss_fn(y_b, model(x_b, training=True)) + ewc.penalty()

    A ``tf.function`` that calls :meth:`penalty` must be traced after any consolidation
    that changes the penalty's structure (with ``curvature="kfac"``: the first one, and
    each task of a ``"separate"`` or ``kfac_sum="exact"`` EWC; a new head entering the
    state): an older trace raises (NaN under XLA).  :func:`fastewc.make_train_step` and
    :class:`fastewc.EWCModel` retrace by themselves.
    """

    # Python-side references, not state: kept out of tf.Module's variable walk.
    _TF_MODULE_IGNORED_PROPERTIES = frozenset(
        tf.Module._TF_MODULE_IGNORED_PROPERTIES | {
            "_model", "_exclude", "_plan_cache", "_lock", "state_guard", _ESTIMATORS, "_restorer",
            "_structure_version", "_structure_seen", "_structure_count", "_traced_versions"})

    def __init__(self, model, *, lam, mode="separate", gamma=1.0, exclude=None, curvature="diagonal",
                 damping=0.0, kfac_sum="exact"):
        super().__init__(name="ewc")
        self._configure(model, lam=lam, mode=mode, gamma=gamma, exclude=exclude, curvature=curvature,
                        damping=damping, kfac_sum=kfac_sum)
        if model.built:
            self._track_new_variables()
        self._sync_structure()

    def _configure(self, model, *, lam, mode, gamma, exclude, num_tasks=0, const=0.0,
                   curvature="diagonal", damping=0.0, kfac_sum="exact"):
        """Check the arguments and create the scalar state; no per-variable state yet."""
        check_one_of("mode", mode, MODES)
        lam = check_lam(lam)
        gamma = _check_gamma(gamma, mode)
        damping = _check_kfac_options(curvature, damping, kfac_sum, mode)
        object.__setattr__(self, "_model", _check_any_model(model))  # not a checkpoint dependency
        object.__setattr__(self, "_exclude", self._exclude_predicate(exclude))
        object.__setattr__(self, "_lock", threading.RLock())
        object.__setattr__(self, "state_guard", ReadersWriterLock())   # steps shared, commits exclusive
        object.__setattr__(self, "_restorer", Restorer(self))   # before any tracked attribute
        with tf.init_scope():              # not checkpointed: it counts this process's changes
            object.__setattr__(self, "_structure_version",
                               tf.Variable(0, dtype=tf.int64, trainable=False, name="structure_version"))
        object.__setattr__(self, "_structure_seen", ((), ()))
        object.__setattr__(self, "_structure_count", 0)
        object.__setattr__(self, "_traced_versions", set())
        self._lam = tf.Variable(lam, dtype=tf.float64, trainable=False, name="lam")
        self._gamma = tf.Variable(gamma, dtype=tf.float64, trainable=False, name="gamma")
        self._mode_index = tf.Variable(MODES.index(mode), dtype=tf.int32, trainable=False, name="mode")
        self._num_tasks = tf.Variable(num_tasks, dtype=tf.int64, trainable=False, name="num_tasks")
        self._const = tf.Variable(const, dtype=tf.float64, trainable=False, name="const")
        self._curvature_index = tf.Variable(CURVATURES.index(curvature), dtype=tf.int32, trainable=False,
                                            name="curvature")
        self._kfac_sum_index = tf.Variable(KFAC_SUMS.index(kfac_sum), dtype=tf.int32, trainable=False,
                                           name="kfac_sum")
        self._damping = tf.Variable(damping, dtype=tf.float64, trainable=False, name="damping")
        restorer = self._restorer                # the tables must not keep the EWC alive
        self._fisher = _StateTable("fisher", lambda key: restorer.entry(("fisher", key)))  # key -> A
        self._anchor = _StateTable("anchor", lambda key: restorer.entry(("anchor", key)))  # key -> μ
        # block -> Kronecker terms (curvature="kfac")
        self._kronecker = KroneckerState(lambda key: restorer.entry(("terms", key)))
        self._invalidate_plan()

    # -- configuration ---------------------------------------------------------------
    @property
    def model(self):
        """The model; assign a new one that contains the tracked variables (e.g. a
        functional model rebuilt with a new head on the same layers) to move the state."""
        return self._model

    @model.setter
    def model(self, model):
        _check_any_model(model)
        with self._lock:
            previous = self._model
            object.__setattr__(self, "_model", model)
            self._invalidate_plan()
            try:
                if model.built:
                    self._check_tracked_present(self._model_variables_by_key())
            except ValueError:
                object.__setattr__(self, "_model", previous)
                raise
            _cache.owned_cache(self, _ESTIMATORS).clear()    # they belong to the previous model

    @property
    def mode(self):
        return MODES[int(self._mode_index.numpy())]

    @property
    def lam(self):
        return float(self._lam.numpy())

    @lam.setter
    def lam(self, value):
        self._lam.assign(check_lam(value))

    @property
    def gamma(self):
        return float(self._gamma.numpy())

    @property
    def curvature(self):
        """``"diagonal"`` or ``"kfac"``: what :meth:`consolidate` computes for each task."""
        return CURVATURES[int(self._curvature_index.numpy())]

    @property
    def kfac_sum(self):
        return KFAC_SUMS[int(self._kfac_sum_index.numpy())]

    @property
    def damping(self):
        """δ ≥ 0, the factored Tikhonov damping of the Kronecker terms (settable)."""
        return float(self._damping.numpy())

    @damping.setter
    def damping(self, value):
        self._damping.assign(_check_kfac_options(self.curvature, value, self.kfac_sum, self.mode))

    @property
    def num_tasks(self):
        """Number of consolidated tasks (an int; a tensor inside ``tf.function``)."""
        if tf.executing_eagerly():
            return int(self._num_tasks.numpy())
        return self._num_tasks.read_value()

    @property
    def tracked_paths(self):
        """The tracked variables' keys (paths relative to the model), in state order.
        Only grows: a compiled step that penalizes the state retraces when it does."""
        return list(self._fisher.keys())

    def state(self):
        """``{path: (A, μ)}``: copies of the per-variable state as float32 NumPy arrays."""
        with self._lock:
            return {k: (self._fisher[k].numpy(), self._anchor[k].numpy()) for k in self._fisher}

    def kronecker_state(self):
        """``{(kernel path, bias path or None): [(c, A, G, W̄*)]}``: copies of the Kronecker
        terms (``curvature="kfac"``) as float32 NumPy arrays (:mod:`fastewc.kfac_penalty`)."""
        with self._lock:
            return self._kronecker.snapshot()

    @property
    def structure_token(self):
        """Changes when the penalty's structure does (tracked variables or Kronecker terms
        added or dropped, by a consolidation or a checkpoint restore): a compiled step that
        penalizes the state retraces then.  ``(tracked variables, Kronecker terms, version)``."""
        return (len(self._fisher), self._kronecker.num_terms, self._structure_count)

    def _sync_structure(self):
        """Count a change of the penalty's structure (the tracked keys, the Kronecker blocks
        and their term counts) in the structure version that traces check (:meth:`_guarded_lam`);
        warn when a trace of :meth:`penalty` made before it is now stale."""
        structure = (tuple(self._fisher.keys()),
                     tuple((block, len(terms)) for block, terms in self._kronecker.blocks.items()))
        if structure == self._structure_seen:
            return
        stale = self._structure_count in self._traced_versions
        object.__setattr__(self, "_structure_seen", structure)
        object.__setattr__(self, "_structure_count", self._structure_count + 1)
        self._structure_version.assign(self._structure_count)
        self._invalidate_plan()
        if stale:
            warnings.warn(_STALE_TRACE.replace("this tf.function traced", "a tf.function traced") +
                          " Calling the old trace raises (its penalty is NaN under jit_compile=True).",
                          RuntimeWarning, stacklevel=3)

    @property
    def state_bytes(self):
        """Bytes of state: 2 float32 (A, μ) per tracked parameter, plus the Kronecker
        terms (c, A, G, W̄*: 1 + d'² + u² + d'u float32 each)."""
        return sum(int(np.prod(v.shape)) * 4 * 2 for v in self._fisher.values()) + self._kronecker.state_bytes

    def __repr__(self):
        kfac = (f" curvature='kfac' kfac_sum={self.kfac_sum!r} damping={self.damping:g}"
                if self.curvature == "kfac" else "")
        return (f"<fastewc.EWC mode={self.mode!r} lam={self.lam:g} gamma={self.gamma:g}{kfac} "
                f"num_tasks={self.num_tasks} variables={len(self._fisher)}>")

    # -- variables -------------------------------------------------------------------
    def _key(self, variable):
        return _relative_path(self._model, variable)

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

    def _track_new_variables(self, initial=None, *, consume=False):
        """The one place per-variable state is created: for each untracked key of
        ``initial`` (``{key: (A, μ)}``, in its order) that value, then zero state for every
        new trainable, not excluded variable of the model (in model order).  ``consume``
        removes each entry from ``initial`` once its state exists, so that a large state
        read from a file is held twice one variable at a time, not whole."""
        keys = [self._key(v) for v in self._model.trainable_variables]
        dupes = sorted({k for k in keys if keys.count(k) > 1})
        if dupes:
            raise ValueError(f"EWC tracks variables by path, but model '{self._model.name}' has "
                             f"several trainable variables with the same path: {dupes}")
        created = False
        for key in list(initial or {}):
            if key not in self._fisher:
                self._create_state(key, *initial[key])
                created = True
            if consume:
                del initial[key]
        for v in self._new_trainable_variables():
            zeros = np.zeros(_shape(v), np.float32)
            self._create_state(self._key(v), zeros, zeros)
            created = True
        if created:
            self._invalidate_plan()

    def _create_state(self, key, a, mu):
        with tf.init_scope():
            self._fisher[key] = tf.Variable(a, dtype=tf.float32, trainable=False, name="fisher")
            self._anchor[key] = tf.Variable(mu, dtype=tf.float32, trainable=False, name="anchor")

    # -- checkpoints (tf.train.Checkpoint) ------------------------------------------------
    def _trackable_children(self, save_type="checkpoint", **kwargs):
        """The checkpoint view: each scalar as a staging entry (:mod:`fastewc._state_table`),
        then the tables of A, μ and Kronecker terms (same keys as plain attributes)."""
        if save_type != "checkpoint":
            return super()._trackable_children(save_type, **kwargs)
        children = {name: self._restorer.entry(("scalar", name)) for name in _SCALARS}
        children.update(_fisher=self._fisher, _anchor=self._anchor, _kronecker=self._kronecker)
        return children

    def _lookup_dependency(self, name, cached_dependencies=None):
        if name in _SCALARS:
            return self._restorer.entry(("scalar", name))
        return super()._lookup_dependency(name, cached_dependencies)

    def _checkpoint_value(self, address):
        """The live tensor a checkpoint entry saves (a scalar of its dtype if there is none)."""
        kind, key = address
        if kind == "scalar":
            return getattr(self, key).read_value()
        table = {"fisher": self._fisher, "anchor": self._anchor, "terms": self._kronecker._terms}[kind]
        variable = table.get(key)
        return tf.zeros([], tf.float32) if variable is None else variable.read_value()

    def _restore_checkpoint(self, values):
        """Make the state exactly the checkpoint's: ``values`` = ``{(kind, key): tensor}``,
        every EWC tensor of the restored checkpoint.  Everything is checked first (a key the
        model lacks or has with another shape, an unbuilt model, a malformed Kronecker
        block raise, nothing assigned); then the scalars are assigned, A and μ of the saved
        keys assigned or created, tracked keys the checkpoint lacks dropped (zero state if
        they are trainable: what a new EWC would track), Kronecker blocks and terms made the
        checkpoint's (:meth:`KroneckerState.replace`)."""
        with self._lock:
            scalars, state, blocks = self._checked_checkpoint(values)
            by_key = self._model_variables_by_key() if self._model.built else {}
            with self.state_guard.exclusive():      # no train step reads a half-restored state
                self._assign_checkpoint(scalars, state, blocks, by_key)

    def _assign_checkpoint(self, scalars, state, blocks, by_key):
        """The assignments of :meth:`_restore_checkpoint`, its values checked."""
        for name, value in scalars.items():
            getattr(self, name).assign(value)
        for key in list(self._fisher):
            v = by_key.get(key)
            if key in state:
                continue
            if v is not None and v.trainable and not self._exclude(v):
                state[key] = (tf.zeros(v.shape, tf.float32),) * 2
            else:
                del self._fisher[key]
                del self._anchor[key]
        for key, (a, mu) in state.items():
            if key in self._fisher:
                self._fisher[key].assign(a)
                self._anchor[key].assign(mu)
            else:
                self._create_state(key, a, mu)
        self._kronecker.replace(blocks)
        if self._model.built:
            self._track_new_variables()
        self._invalidate_plan()
        self._sync_structure()

    def _checked_checkpoint(self, values):
        """``(scalars, {key: (A, μ)}, {block: [Term]})`` of a checkpoint's EWC tensors,
        every shape checked against the model; raises a ValueError naming the first
        mismatch (the state is not touched)."""
        scalars = {name: values[("scalar", name)] for name in _SCALARS if ("scalar", name) in values}
        for name, value in scalars.items():
            if value.shape.rank != 0:
                raise ValueError(f"Cannot restore EWC state from the checkpoint: its '{name[1:]}' must "
                                 f"be a scalar. Received: shape {tuple(value.shape)}")
        header = {name: (scalars[name] if name in scalars else getattr(self, name)).numpy()
                  for name in _SCALARS}
        try:
            mode = MODES[int(header["_mode_index"])]
            check_lam(float(header["_lam"]))
            _check_gamma(float(header["_gamma"]), mode)
            _check_kfac_options(CURVATURES[int(header["_curvature_index"])], float(header["_damping"]),
                                KFAC_SUMS[int(header["_kfac_sum_index"])], mode)
        except (ValueError, IndexError) as err:
            raise ValueError(f"Cannot restore EWC state from the checkpoint: invalid settings "
                             f"({err}).") from None
        tables = {kind: {key: t for (k, key), t in values.items() if k == kind}
                  for kind in ("fisher", "anchor", "terms")}
        keys = list(tables["fisher"]) + [k for k in tables["anchor"] if k not in tables["fisher"]]
        state = {}
        for key in keys:
            v = self._restore_target(key, "EWC state")
            if self._exclude(v):
                raise ValueError(
                    f"Cannot restore the EWC state of variable '{v.path}' from the checkpoint: "
                    "this EWC excludes it. Create the EWC with the `exclude` it was saved with.")
            for kind, label in (("fisher", "A"), ("anchor", "μ")):
                t = tables[kind].get(key)
                if t is None:
                    raise ValueError(f"Cannot restore the EWC state of variable '{key}' from the "
                                     f"checkpoint: it has no {label} ('_{kind}/{key}') for it.")
                if tuple(t.shape) != _shape(v):
                    raise ValueError(
                        f"Cannot restore the EWC state of variable '{v.path}' from the checkpoint: "
                        f"its {label} there has shape {tuple(t.shape)}, the model's variable has "
                        f"shape {_shape(v)}. Nothing was restored into the EWC. Restore into the "
                        "model the checkpoint was written for.")
            state[key] = (tables["fisher"][key], tables["anchor"][key])
        return scalars, state, self._checked_blocks(tables["terms"])

    def _checked_blocks(self, fields):
        """``{block: [Term]}`` of the Kronecker term fields ``{term key: tensor}`` of a
        checkpoint: every term complete (c, A, G, W̄*), numbered from 0, shaped from the
        model's kernel (:func:`fastewc._kfac_state.block_shapes`)."""
        grouped = {}
        for key, value in fields.items():
            parsed = parse_term_key(key)
            if parsed is None:
                raise ValueError(f"Cannot restore EWC Kronecker state '{key}' from the checkpoint: "
                                 "not a Kronecker term key.")
            block, t, field = parsed
            grouped.setdefault(block, {}).setdefault(t, {})[field] = value
        blocks = {}
        for block, terms in grouped.items():
            kernel = self._restore_target(block[0], "EWC Kronecker state")
            if block[1] is not None:
                self._restore_target(block[1], "EWC Kronecker state")
            shapes = dict(zip(FIELDS, block_shapes(tuple(kernel.shape), block[1] is not None)))
            if sorted(terms) != list(range(len(terms))) or any(len(f) != len(FIELDS) for f in terms.values()):
                raise ValueError(
                    f"Cannot restore the EWC Kronecker state of '{block[0]}' from the checkpoint: its "
                    f"terms are incomplete (numbers {sorted(terms)}, each needs {list(FIELDS)}).")
            for t in range(len(terms)):
                for field in FIELDS:
                    if tuple(terms[t][field].shape) != shapes[field]:
                        raise ValueError(
                            f"Cannot restore the EWC Kronecker state of '{kernel.path}' from the "
                            f"checkpoint: its term {t} field '{field}' has shape "
                            f"{tuple(terms[t][field].shape)}, the model's kernel "
                            f"{_shape(kernel)} needs {shapes[field]}. Nothing was restored into "
                            "the EWC. Restore into the model the checkpoint was written for.")
            blocks[block] = [kfac_penalty.Term(*(terms[t][f] for f in FIELDS)) for t in range(len(terms))]
        return blocks

    def _restore_target(self, key, what):
        """The model variable of a checkpoint's ``key``, or a ValueError (the model is not
        built, or has no such variable)."""
        model = self._model
        if not model.built:
            raise ValueError(
                f"Cannot restore the {what} of variable '{key}' from the checkpoint: "
                f"model '{model.name}' is not built, so the EWC has no variable to restore "
                "it into. Build the model first (call it on a batch, or "
                "model.build(input_shape)), then restore.")
        v = self._model_variables_by_key().get(key)
        if v is None:
            raise ValueError(
                f"Cannot restore the {what} of variable '{key}' from the checkpoint: "
                f"model '{model.name}' has no variable with that path. Add it to the model "
                "(e.g. the task head it was saved with) before restoring.")
        return v

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
                    f"'{self._model.name}' has no variable with that path. Every variable the EWC "
                    "tracks must stay in its model (for one head of a multi-output model, keep the "
                    "EWC on the whole model and pass the head to ewc.consolidate(data, loss=..., "
                    "model=keras.Model(full.inputs, full.outputs[i]))); to drop a variable, build "
                    "a new EWC.")
            if _shape(v) != _shape(a):
                raise ValueError(
                    f"Variable '{v.path}' has shape {_shape(v)}, but the EWC state tracks it with "
                    f"shape {_shape(a)}. A tracked variable must keep its shape; to change it, "
                    "build a new EWC.")
            found.append(v)
        return found

    # -- the plan --------------------------------------------------------------------
    def _invalidate_plan(self):
        """Forget the cached :class:`PenaltyPlan` (the model or the tracked set changed)."""
        object.__setattr__(self, "_plan_cache", None)

    def _plan(self):
        """The :class:`PenaltyPlan`, cached until the model's variables or the tracked set
        change."""
        signature = (tuple(id(v) for v in self._model.variables),
                     tuple(id(v) for v in self._model.trainable_variables), self.structure_token)
        cache = self._plan_cache
        if cache is not None and cache[0] == signature:
            return cache[1]
        if not self._model.built:
            plan = _NO_PLAN
        else:
            by_key = self._model_variables_by_key()
            found = self._check_tracked_present(by_key)
            kronecker = [(tuple(by_key[k] for k in block if k is not None), terms)
                         for block, terms in self._kronecker.blocks.items()]
            plan = PenaltyPlan(variables=found, fisher=list(self._fisher.values()),
                               anchors=list(self._anchor.values()),
                               position={id(v): i for i, v in enumerate(found)},
                               trainable=list(self._model.trainable_variables), kronecker=kronecker)
        object.__setattr__(self, "_plan_cache", (signature, plan))
        return plan

    # -- the penalty -----------------------------------------------------------------
    def penalty_is_active(self):
        """A bool tensor: λ > 0 and at least one task consolidated.  When False the
        penalty and its gradient are exactly 0 (no state yet, or λ = 0), so a train step
        can skip them (``tf.cond``); works eagerly and inside ``tf.function``."""
        return tf.logical_and(self._lam > 0, self._num_tasks > 0)

    def _eager_lock(self):
        """The state lock for an eager read (a consistent A, μ, c); none while tracing (a
        compiled function reads the variables when it runs, not when it is traced)."""
        return self._lock if tf.executing_eagerly() else contextlib.nullcontext()

    def _value_and_grads(self, inline=False):
        """(value, grads along ``model.trainable_variables``): the diagonal part from one
        compiled function, plus the Kronecker terms' from another."""
        with self._eager_lock():
            plan = self._plan()
            lam = self._guarded_lam(inline)
            if plan.variables:
                value, grads = penalty_lib.ewc_penalty_and_gradients(
                    plan.variables, plan.fisher, plan.anchors, lam,
                    const=tf.cast(self._const, tf.float32), inline=inline)
            else:
                value, grads = 0.5 * lam * tf.cast(self._const, tf.float32), []
            grads = self._align(grads, plan)
            if plan.kronecker:
                value, grads = self._add_kronecker(plan, value, grads, lam, inline)
            return value, grads

    def _guarded_lam(self, inline):
        """λ as a float32 tensor, checked against a stale trace when traced (eagerly there
        is nothing to check: the plan is read at each call).

        A trace bakes in the penalty's structure (which variables, which Kronecker terms),
        read when it was traced; a consolidation that adds to it, or a restore that
        changes it, bumps ``_structure_version`` (:meth:`_sync_structure`).  The trace
        compares it with the version it was traced at: on a mismatch it raises (a
        ``tf.debugging.Assert``: an InvalidArgumentError naming the fix) and, where the
        assertion does not run (XLA drops it under ``jit_compile=True``), λ is NaN, and so
        are the value and the gradients (at no cost: λ scales every term).  A stale trace
        never returns a silently partial penalty.  Why not a structure traceable in
        advance (each block's terms in variables of unknown leading size): it needs every
        Kronecker block known before the first task, and a new head would still change
        the structure, so this check would be needed anyway; one mechanism covers both
        curvatures and the grown diagonal.  Traces of
        :meth:`penalty` (not ``inline``: the trainers, which retrace, trace inline) also
        make the consolidation that staled them warn."""
        lam = tf.cast(self._lam, tf.float32)
        if tf.executing_eagerly():
            return lam
        traced = self._structure_count
        if not inline:
            self._traced_versions.add(traced)
        stale = tf.not_equal(self._structure_version.read_value(), traced)
        check = tf.debugging.Assert(tf.logical_not(stale), [_STALE_TRACE])
        with tf.control_dependencies([check]):
            return lam + tf.where(stale, tf.constant(np.nan, tf.float32), tf.constant(0.0))

    def _add_kronecker(self, plan, value, grads, lam, inline):
        """``value`` and ``grads`` plus the Kronecker terms' penalty and gradients
        (:func:`fastewc.kfac_penalty.kfac_penalty_and_gradients`)."""
        blocks = [([penalty_lib.read_float32(v) for v in variables], [term.values() for term in terms])
                  for variables, terms in plan.kronecker]
        k_value, k_grads = kfac_penalty.kfac_penalty_and_gradients(
            blocks, lam, tf.cast(self._damping, tf.float32), inline=inline,
            names=[variables[0].path for variables, _ in plan.kronecker])
        index = {id(v): i for i, v in enumerate(plan.trainable)}
        grads = list(grads)
        flat = [v for variables, _ in plan.kronecker for v in variables]
        for variable, g in zip(flat, k_grads):
            i = index.get(id(variable))
            if i is not None:                 # a frozen block variable needs no gradient
                grads[i] = grads[i] + g
        total = value + k_value
        if not inline:                        # each part is checked; here their sum
            total = penalty_lib.check_finite(total, tf.stack([value, k_value]),
                                             ["the diagonal part", "the Kronecker part"])
        return total, grads

    def penalty(self):
        """λ/2 Σ_i A_i (θ_i − μ_i)² + λc/2: a float32 scalar, differentiable w.r.t. the model's
        weights with the analytic gradient λ·A·(θ − μ) (``tf.custom_gradient``).

        Separate mode: equals Σ_t λ/2 Σ_i F_t,i (θ_i − θ_t,i)² exactly; online mode:
        λ/2 Σ_i F_i (θ_i − θ*_i)².  0 before the first consolidation.  Eager, inside
        ``tf.function`` and under ``jit_compile=True``; float32 under mixed precision.
        A value that overflows float32 (or NaN weights) raises, naming the variable
        (:func:`fastewc.penalty.check_finite`; not under XLA, where TensorFlow drops checks).
        """
        return self._value_and_grads()[0]

    def penalty_and_gradients(self, *, inline=False):
        """``(penalty(), penalty_gradients())`` from ONE compiled function (the value is
        differentiable as in :meth:`penalty`).  ``inline=True`` traces the computation into
        the calling graph without the custom gradient: for train steps that add the
        gradients themselves (:func:`fastewc.penalty.ewc_penalty_and_gradients`)."""
        return self._value_and_grads(inline=inline)

    def penalty_gradients(self):
        """λ·A·(θ − μ) for each of ``model.trainable_variables`` (float32; zeros for variables
        not penalized), computed without a tape: add them to a train step's gradients."""
        with self._eager_lock():
            plan = self._plan()
            if plan.kronecker:
                return self._value_and_grads()[1]
            lam = self._guarded_lam(inline=False)
            if not plan.variables:
                return [tf.zeros(v.shape, tf.float32) * lam for v in plan.trainable]
            grads = penalty_lib.ewc_penalty_gradients(plan.variables, plan.fisher, plan.anchors, lam)
            return self._align(grads, plan)

    @staticmethod
    def _align(grads, plan):
        """``grads`` (one per penalized variable) laid out along ``plan.trainable``."""
        out = []
        for v in plan.trainable:
            i = plan.position.get(id(v))
            out.append(grads[i] if i is not None else tf.zeros(v.shape, tf.float32))
        return out

    # -- consolidation ---------------------------------------------------------------
    def consolidate(self, data, *, loss, kind="exact", method="auto", batch_size=None, rules=None,
                    num_samples=1, seed=None, jit_compile=None, verbose=0, max_examples=None,
                    model=None, positions="sum"):
        """Consolidate the task ``data``: its diagonal Fisher at the current weights, then
        the current weights become this task's anchor (see :meth:`add_task`).

        ``model``: None (the EWC's model), or a sub-model built on the EWC model's layers
        whose output is this task's (one head of a multi-output model:
        ``keras.Model(full.inputs, full.outputs[i])``).  The Fisher is then the sub-model's,
        F = 0 for the variables it does not use (see :meth:`add_task`), so every head of one
        model consolidates into one EWC.

        The Fisher comes from a :class:`fastewc.FisherEstimator` that this EWC keeps per
        configuration (``loss``, ``kind``, ``method``, ``batch_size``, ``rules``,
        ``num_samples``, ``jit_compile``, ``positions``; see :func:`fastewc.fisher_diagonal`
        for each), so
        consolidating task after task plans and traces once.  ``seed``, ``verbose`` and
        ``max_examples`` (the most examples read, see :func:`fastewc.fisher_diagonal`) are
        per call.

        All or nothing: the Fisher and the new state are computed first and assigned at
        the end, so an error leaves the state unchanged.  Thread-safe: concurrent calls on
        one EWC run one after the other (the EWC's lock is held from the Fisher to the
        commit: the estimator's plan and traces are not shared between threads, and one
        Fisher already uses every core).  Returns the Fisher (list aligned with
        ``model.trainable_variables`` -- the sub-model's with ``model`` --; with
        ``curvature="kfac"`` the :class:`fastewc.KroneckerFisher`, and ``method`` must be
        "auto" or "factored").
        """
        self._require_eager("consolidate")
        with self._lock:
            if self._model.built:
                self._check_tracked_present(self._model_variables_by_key())
            source = self._task_model(model)
            estimator = self._estimator(source, loss=loss, kind=kind, method=method,
                                        batch_size=batch_size, rules=rules,
                                        num_samples=num_samples, jit_compile=jit_compile,
                                        curvature=self.curvature, positions=positions)
            fisher = estimator(data, seed=seed, verbose=verbose, max_examples=max_examples)
            self.add_task(fisher, model=model)
            return fisher

    def _estimator(self, model, **config):
        """This EWC's :class:`fastewc.FisherEstimator` of ``model`` (its own, or a sub-model)
        for ``config`` (made on first use; dropped with the EWC, or when :attr:`model` is
        reassigned).  The estimator holds ``model``, so its id names it while cached."""
        from fastewc.estimator import FisherEstimator, make_config   # ewc -> fisher, lazily

        key = (id(model), make_config(**config))
        estimators = _cache.owned_cache(self, _ESTIMATORS)
        estimator = estimators.get(key)
        if estimator is None:
            estimator = estimators[key] = FisherEstimator(model, **config)
        return estimator

    def _task_model(self, model):
        """The model a task's Fisher is over: this EWC's model (``model`` None), or a
        sub-model whose trainable variables are all trainable variables of it (the same
        objects: built on its layers), else a ValueError naming the first one that is not."""
        if model is None or model is self._model:
            return check_model(self._model, trainable=False)
        check_model(model, trainable=False, layer_ok=False)
        ours = {id(v) for v in check_model(self._model, trainable=False).trainable_variables}
        foreign = [v for v in model.trainable_variables if id(v) not in ours]
        if foreign:
            raise ValueError(
                f"`model` must be a sub-model of this EWC's model '{self._model.name}', built on its "
                "layers (e.g. one head: keras.Model(full.inputs, full.outputs[i])). Received: "
                f"model '{model.name}', whose trainable variable '{foreign[0].path}' is not a "
                f"trainable variable of '{self._model.name}' ({len(foreign)} such variables).")
        return model

    def add_task(self, fisher, anchors=None, *, model=None):
        """Absorb a task whose diagonal Fisher is already known.

        Args:
          fisher: list aligned with ``model.trainable_variables`` (as returned by
            :func:`fastewc.fisher_diagonal`), F ≥ 0 and finite; with ``curvature="kfac"``
            a :class:`fastewc.KroneckerFisher`.
          anchors: the task's weights θ_t, aligned the same way; None: the current weights.
          model: None (the EWC's model), or the sub-model ``fisher`` was computed over: a
            model built on the EWC model's layers (one head of a multi-output model), whose
            trainable variables are all the EWC model's (by identity).

        separate: (A, μ, c) ← merge_separate(A, μ, F, θ_t); online: (A, μ) ← (γA + F, θ_t).
        Tracked variables that are no longer trainable, and with ``model`` those the
        sub-model does not use, get F = 0 and θ_t = their current weights: the task's Fisher
        over the whole model, which is 0 where its likelihood does not depend on a weight.
        So separate mode keeps their A, c and penalty exactly (μ moves only where A = 0,
        where it has no weight), the sum over tasks stays Σ_t λ/2 Σ_i F_t,i (θ_i − θ_t,i)²
        with F_t = 0 off task t's sub-model; online mode decays their A by γ and moves their
        anchor to the current weights, as at every task (γ counts tasks, not the tasks that
        touched a variable; a block without factors likewise).  All or nothing: validate,
        merge (nothing assigned), then commit (rolled back if interrupted), under the EWC's
        lock: concurrent calls are applied one after the other, each merged against the
        state it commits over.  The commit also holds ``state_guard`` exclusively: it waits
        for the compiled train steps running in other threads, and holds back new ones.
        """
        self._require_eager("add_task")
        with self._lock:
            source = self._task_model(model)
            blocks = None
            if isinstance(fisher, KroneckerFisher):
                fisher, blocks = self._split_kronecker(fisher, source)
            elif self.curvature == "kfac":
                raise TypeError(
                    "`fisher` must be a fastewc.KroneckerFisher (fastewc.kfac_fisher's result) for "
                    f"an EWC with curvature='kfac'. Received: fisher of type {type(fisher).__name__}")
            task = self._validate_task(fisher, anchors, source)
            update = self._merge_task(task)
            pending = self._merge_kronecker(blocks, task) if blocks is not None else {}
            with self.state_guard.exclusive():   # no train step runs during the commit
                undo = self._kronecker.commit(pending)
                try:
                    self._commit(update)
                except BaseException:
                    undo()
                    raise
                finally:
                    self._sync_structure()

    # -- Kronecker terms (curvature="kfac") -------------------------------------------
    def _split_kronecker(self, result, source):
        """A :class:`fastewc.KroneckerFisher` of ``source`` (the model or a sub-model) → (the
        diagonal list along ``source.trainable_variables``, zeros for the variables its
        blocks cover; ``{block: (layer name, A, G)}`` of the blocks this EWC penalizes)."""
        if self.curvature != "kfac":
            raise ValueError(
                "`fisher` is a fastewc.KroneckerFisher, but this EWC has curvature='diagonal'. "
                "Build it with fastewc.EWC(model, lam=..., curvature='kfac'), or pass the diagonal "
                "(fastewc.fisher_diagonal). Received: a KroneckerFisher")
        trainable = list(source.trainable_variables)
        if [id(v) for v in result.variables] != [id(v) for v in trainable]:
            raise ValueError(
                f"`fisher` was computed for other trainable variables than model '{source.name}' "
                f"has now ({len(result.variables)} then, {len(trainable)} now). Received: a "
                "KroneckerFisher of another model or an older state of this one")
        diagonal = [tf.zeros(v.shape, tf.float32) if f is None else f
                    for v, f in zip(trainable, result.diagonal)]
        blocks = {}
        for block in result.blocks:
            excluded = [self._exclude(v) for v in block.variables]
            if all(excluded):
                continue
            if any(excluded):
                raise ValueError(
                    f"`exclude` covers part of layer '{block.layer}''s Kronecker block "
                    f"{[v.path for v in block.variables]}: exclude all of its variables or none.")
            keys = tuple(self._key(v) for v in block.variables)
            blocks[keys if len(keys) == 2 else keys + (None,)] = (block.layer, block.a, block.g)
        return diagonal, blocks

    def _merge_kronecker(self, blocks, task):
        """Every block's new terms (:func:`fastewc.kfac_penalty.merge_block`, nothing
        assigned): the task's blocks at the task's weights, and the blocks it has no factors
        for decayed (:func:`fastewc.kfac_penalty.decay_block`).  Raises for factors that
        are not finite or have a negative diagonal, and for a merge that is not finite in
        float32, naming the layer."""
        mode, kfac_sum, gamma = self.mode, self.kfac_sum, self.gamma
        pending = {}

        def anchor_of(block):
            return kronecker.weight_matrix([task.theta[k] if k in task.theta else
                                            penalty_lib.read_float32(task.by_key[k])
                                            for k in block if k is not None])

        for block, (layer, a, g) in blocks.items():
            for label, factor in (("A", a), ("G", g)):
                if not (bool(tf.reduce_all(tf.math.is_finite(factor)))
                        and bool(tf.reduce_all(tf.linalg.diag_part(factor) >= 0))):
                    raise ValueError(
                        f"`fisher`: the Kronecker factor {label} of layer '{layer}' must be finite "
                        "with a non-negative diagonal. Received: NaN, Inf or a negative diagonal")
            current = [kfac_penalty.Term(*(v.read_value() for v in t.values()))
                       for t in self._kronecker.blocks.get(block, [])]
            pending[block], _ = kfac_penalty.merge_block(
                current, (tf.cast(a, tf.float32), tf.cast(g, tf.float32), anchor_of(block)),
                mode=mode, kfac_sum=kfac_sum, gamma=gamma)
        for block, terms in self._kronecker.blocks.items():
            if block not in pending:
                current = [kfac_penalty.Term(*(v.read_value() for v in t.values())) for t in terms]
                pending[block] = kfac_penalty.decay_block(current, anchor_of(block), mode=mode, gamma=gamma)
        for block, terms in pending.items():
            values = [v for term in terms for v in term.values()]
            if not all(bool(tf.reduce_all(tf.math.is_finite(tf.cast(v, tf.float32)))) for v in values):
                raise ValueError(
                    f"`fisher`: adding this task would make the Kronecker terms of '{block[0]}' not "
                    "finite in float32 (the weights or the factors are too large). The state is "
                    "unchanged.")
        return pending

    def _validate_task(self, fisher, anchors, model):
        """Argument checks (types, lengths, dtypes, shapes) → the new per-key F and θ of
        ``model``'s trainable variables (the EWC's model or a sub-model of it, keyed as the
        EWC's model's variables; the others get F = 0 in :meth:`_merge_task`)."""
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
            new_fisher[key] = as_float32(fisher[i])
            new_theta[key] = (penalty_lib.read_float32(v) if anchors is None
                              else as_float32(anchors[i]))
        return _Task(new_fisher, new_theta, by_key, anchors is not None)

    def _merge_task(self, task):
        """The new (A, μ) of every tracked or entering variable and the constant's
        increment (:func:`fastewc.penalty.merge_all`); nothing is assigned.  Raises for a
        negative or non-finite Fisher, for a non-finite anchor and for a merge whose float32
        result (A, μ or c) would not be finite, naming the variable."""
        by_key = task.by_key
        fresh = {self._key(v): v for v in self._new_trainable_variables()}
        keys = list(self._fisher) + [k for k in fresh if k not in self._fisher]
        old, fs, thetas = [], [], []
        for key in keys:
            if key in self._fisher:
                old.append((self._fisher[key].read_value(), self._anchor[key].read_value()))
            else:
                zeros = tf.zeros(_shape(fresh[key]), tf.float32)
                old.append((zeros, zeros))
            if key in task.fisher:
                fs.append(task.fisher[key])
                thetas.append(task.theta[key])
            else:                                # tracked but frozen: no new information
                fs.append(tf.zeros(_shape(by_key[key]), tf.float32))
                thetas.append(penalty_lib.read_float32(by_key[key]))
        a_new, mu_new, delta_c, bad = penalty_lib.merge_all(
            [o[0] for o in old], [o[1] for o in old], fs, thetas,
            self.mode == "online", self._gamma.read_value())
        for key, (bad_fisher, bad_theta) in zip(keys, bad.numpy()):
            if bad_theta:
                where = ("`anchors` entry for variable" if task.anchors_given and key in task.theta
                         else "The `model` weights of variable")
                raise ValueError(
                    f"{where} '{by_key[key].path}' must be finite to be a task's anchor. Received: "
                    "NaN or Inf values (did training diverge?)")
            if bad_fisher:
                f = fs[keys.index(key)]
                low, high = float(tf.reduce_min(f)), float(tf.reduce_max(f))
                if np.isfinite(low) and np.isfinite(high) and low >= 0:
                    i = keys.index(key)
                    a_finite = bool(tf.reduce_all(tf.math.is_finite(a_new[i])))
                    raise _overflow_error(by_key[key].path, high, float(tf.reduce_max(old[i][0])),
                                          a_overflows=not a_finite)
                raise ValueError(
                    f"`fisher`: the Fisher of variable '{by_key[key].path}' must be finite and >= 0. "
                    f"Received: values in [{low}, {high}]. "
                    "(Negative values come from a probability loss with from_logits=False on a "
                    "model whose output is not a softmax/sigmoid: pass from_logits=True for logits.)")
        const = float(self._const.numpy()) + float(delta_c)
        if not abs(const) <= _FLOAT32_MAX:                 # the penalty reads c as float32
            shares = [float(penalty_lib.merge_separate(o[0], o[1], f, t)[2])
                      for o, f, t in zip(old, fs, thetas)]
            worst = keys[int(np.argmax(shares))]
            raise ValueError(
                f"`fisher`: adding this task would overflow the float32 EWC state: the constant "
                f"c of the separate-mode penalty would reach {const:.3g}, above float32's largest "
                f"value {_FLOAT32_MAX:.4g} (variable '{by_key[worst].path}' adds the most, "
                f"{max(shares):.3g}). The state is unchanged. Received: a Fisher or anchors too "
                "large for float32 (rescale the loss or the weights, or use mode='online').")
        return _Update(keys, old, list(zip(a_new, mu_new)), delta_c, set(fresh))

    def _commit(self, update):
        """Assign ``update``, or restore the state as it was if anything interrupts it."""
        const, num_tasks = self._const.read_value(), self._num_tasks.read_value()
        pending = dict(zip(update.keys, update.new))
        try:
            self._track_new_variables(initial={k: pending[k] for k in update.keys
                                               if k in update.fresh})
            for key, (a, mu) in pending.items():
                if key not in update.fresh:
                    self._fisher[key].assign(a)
                    self._anchor[key].assign(mu)
            if self.mode == "separate":
                self._const.assign_add(update.delta_c)
            self._num_tasks.assign_add(1)
        except BaseException:
            for key, (a, mu) in zip(update.keys, update.old):
                if key in update.fresh:           # `del`, not pop(): keeps them checkpointable
                    for table in (self._fisher, self._anchor):
                        if key in table:
                            del table[key]
                else:
                    self._fisher[key].assign(a)
                    self._anchor[key].assign(mu)
            self._const.assign(const)
            self._num_tasks.assign(num_tasks)
            self._invalidate_plan()
            raise

    @staticmethod
    def _require_eager(what):
        if not tf.executing_eagerly():
            raise RuntimeError(f"EWC.{what}() runs eagerly (it reads data and may create state); "
                               "call it outside tf.function.")

    # -- save / load -----------------------------------------------------------------
    def save(self, path):
        """Write the state to ``path`` (an .npz file), atomically (:mod:`fastewc.ewc_file`).

        Stores mode, λ, γ, the task count, c, and for each tracked variable its path, shape,
        A and μ, plus a SHA-256 of it all.  A reader sees the old file or the new one, never
        a partial one.
        """
        self._require_eager("save")
        with self._lock:            # one consistent snapshot, even under a concurrent consolidate
            excluded = (sorted(self._key(v) for v in self._model.variables if self._exclude(v))
                        if self._model.built else [])
            contents = ewc_file.EWCFile(
                mode=self.mode, lam=self.lam, gamma=self.gamma, num_tasks=self.num_tasks,
                const=float(self._const.numpy()), state=self.state(), excluded=excluded,
                curvature=self.curvature, damping=self.damping, kfac_sum=self.kfac_sum,
                kronecker=self._kronecker.snapshot())
        ewc_file.write(path, contents)

    @classmethod
    def load(cls, path, model, *, exclude=None):
        """An EWC for ``model`` with the state saved at ``path`` by :meth:`save`.

        The file is read and verified (format, SHA-256, shapes) and matched against
        ``model`` (every saved path must exist with the saved shape) before anything is
        built: a mismatch raises a ValueError naming the first mismatching variable, a
        truncated or corrupted file raises a ValueError, and nothing is returned half
        loaded.  ``exclude`` defaults to the variables excluded when the file was saved.
        The saved variables are tracked in the file's order, then any other trainable
        variable of ``model`` with zero state, as at construction.
        """
        contents = ewc_file.read(path)
        path = os.fspath(path)
        try:
            check_one_of("mode", contents.mode, MODES)
            lam = check_lam(contents.lam)
            gamma = _check_gamma(contents.gamma, contents.mode)
            num_tasks = int(contents.num_tasks)
            const = float(contents.const)
            damping = _check_kfac_options(contents.curvature, contents.damping, contents.kfac_sum,
                                          contents.mode)
        except (ValueError, TypeError) as err:
            raise ValueError(f"EWC file {path!r} has an invalid header: {err}") from None
        check_model(model, trainable=False)
        if exclude is None:
            saved = set(contents.excluded)
            exclude = lambda v: v.path in saved or _relative_path(model, v) in saved  # noqa: E731
        ewc = cls.__new__(cls)
        super(EWC, ewc).__init__(name="ewc")
        ewc._configure(model, lam=lam, mode=contents.mode, gamma=gamma, exclude=exclude,
                       num_tasks=num_tasks, const=const, curvature=contents.curvature,
                       damping=damping, kfac_sum=contents.kfac_sum)
        by_key = ewc._model_variables_by_key()
        for key, (a, _) in contents.state.items():
            v = by_key.get(key)
            if v is None:
                raise ValueError(
                    f"Cannot load EWC state from {path!r} onto model '{model.name}': the file "
                    f"has variable '{key}' (shape {a.shape}), which the model does not have.")
            if _shape(v) != a.shape:
                raise ValueError(
                    f"Cannot load EWC state from {path!r} onto model '{model.name}': variable "
                    f"'{v.path}' has shape {_shape(v)}, the file has shape {a.shape} for it.")
            if ewc._exclude(v):
                raise ValueError(f"Variable '{v.path}' has EWC state in {path!r} but is excluded.")
        ewc._track_new_variables(initial=contents.state, consume=True)
        ewc._load_kronecker(path, contents.kronecker or {}, by_key)
        ewc._sync_structure()
        return ewc

    def _load_kronecker(self, path, blocks, by_key):
        """Create the Kronecker terms a file holds, each block checked against the model
        (its variables exist, the terms' shapes follow its kernel) before any is created."""
        pending = {}
        for block, terms in blocks.items():
            kernel = by_key.get(block[0])
            missing = [k for k in block if k is not None and k not in by_key]
            if missing:
                raise ValueError(
                    f"Cannot load EWC state from {path!r} onto model '{self._model.name}': the file "
                    f"has Kronecker terms for variable '{missing[0]}', which the model does not have.")
            shapes = block_shapes(tuple(kernel.shape), block[1] is not None)
            for term in terms:
                if tuple(np.shape(v) for v in term) != shapes:
                    raise ValueError(
                        f"Cannot load EWC state from {path!r} onto model '{self._model.name}': the "
                        f"Kronecker terms of '{block[0]}' have shapes {[np.shape(v) for v in term]}, "
                        f"the model's kernel {tuple(kernel.shape)} needs {list(shapes)}.")
            pending[block] = [kfac_penalty.Term(*term) for term in terms]
        self._kronecker.commit(pending)
        self._invalidate_plan()


_FLOAT32_MAX = float(np.finfo(np.float32).max)


def _overflow_error(path, fisher_max, state_max, *, a_overflows):
    """The merge of a finite, non-negative Fisher overflows float32 (A, or the variable's
    share of c: Σ_i A_i F_i / A'_i · (μ_i − θ_i)², anchors far apart)."""
    what = ("A = Σ_t F_t goes beyond" if a_overflows else
            "its share of the separate-mode constant c, Σ A·F/(A + F)·(μ − θ)² (anchors far "
            "apart), goes beyond")
    return ValueError(
        f"`fisher`: adding the Fisher of variable '{path}' would overflow the float32 EWC "
        f"state: {what} float32's largest value {_FLOAT32_MAX:.4g}. The state is unchanged. "
        f"Received: Fisher values up to {fisher_max:.3g} on a state A up to {state_max:.3g} "
        "(rescale the loss or the weights, or use mode='online').")


def _is_real(value):
    """Whether ``value`` is an array/tensor of real numbers (float, int or bool)."""
    dtype = getattr(value, "dtype", None)
    try:
        dtype = tf.as_dtype(dtype if dtype is not None else np.asarray(value).dtype)
    except (TypeError, ValueError):
        return False
    return dtype.is_floating or dtype.is_integer or dtype.is_bool
