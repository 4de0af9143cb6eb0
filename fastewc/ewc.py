"""EWC: a facade over the tracked variables, the block state and the penalty over blocks.

    penalty(θ) = Σ_blocks P_b(θ) + λ/2 · c

Every tracked variable has a diagonal block, λ/2 Σ_i A_i (θ_i − μ_i)² with state (A, μ) and
the separate-mode constant c (:mod:`fastewc.blocks.diagonal`: ``mode="separate"`` keeps
Kirkpatrick et al.'s per-task sum exactly as one quadratic, ``mode="online"`` Schwarz et
al.'s decayed one); ``curvature="kfac"`` adds a Kronecker block A ⊗ G per Dense or
convolution layer (:mod:`fastewc.blocks.kronecker`).  Memory: 2 float32 per penalized
parameter for any number of tasks, plus the Kronecker terms; one compiled function over
all blocks for the value and the analytic gradient (:mod:`fastewc.blocks.penalty`).

The parts: :class:`fastewc._tracking.Tracking` (which variables, their keys, checkpoint
targets, the plan), :class:`fastewc.blocks.store.State` (the scalars and every block's
tf.Variables: one transactional store and the checkpoint view), the block kinds
(:data:`fastewc.blocks.KINDS`: merge, penalty, file and checkpoint of each) and
:class:`fastewc._structure.StructureGuard` (stale traces).  A task: validate (the Fisher
result → each kind's estimates), merge (pure), commit (all or nothing).

The state lives in non-trainable tf.Variables (no retrace when a task only changes
values), and EWC is a ``tf.Module``: ``tf.train.Checkpoint(model=..., ewc=ewc)`` saves and
restores it; a restore gives exactly the checkpoint's state, or raises and changes nothing
(every tensor staged, :mod:`fastewc._state_table`, and checked by its kind first).

Threads: one ``threading.RLock`` per EWC is held across every read-merge-write of the state
(consolidate -- its Fisher included --, add_task, save, state, a restore, eager penalty
reads).  Compiled train steps hold ``state_guard`` (:class:`fastewc._rwlock.ReadersWriterLock`)
shared around each call, a commit exclusively: a step reads the whole state before or
after a task, never a mix.
"""
import contextlib
import os
import threading

import tensorflow as tf

from fastewc import _allocator, _cache, blocks, ewc_file
from fastewc._checks import check_lam, check_model
from fastewc._rwlock import ReadersWriterLock
from fastewc._structure import StructureGuard
from fastewc._tracking import Tracking, relative_path as _relative_path  # noqa: F401 (tests)
from fastewc.blocks.penalty import penalty_and_gradients as _penalty_over_blocks
from fastewc.blocks.store import CURVATURES, MODES, State, file_settings
from fastewc.kfac_penalty import KFAC_SUMS

_ESTIMATORS = _cache.FISHER_ESTIMATORS


class EWC(tf.Module):
    """Elastic Weight Consolidation state and its penalty for a Keras model.

    Args:
      model: the Keras model whose weights are consolidated.
      lam: λ ≥ 0, the penalty strength (settable later: ``ewc.lam = 10.0``).
      mode: ``"separate"`` — Σ_t λ/2 Σ_i F_t,i (θ_i − θ_t,i)² (Kirkpatrick et al. 2017), kept
        as ONE quadratic; ``"online"`` — F ← γ·F + F_new, anchor ← latest weights (Schwarz et al. 2018).
      gamma: γ ∈ [0, 1], the online decay of older tasks (only with ``mode="online"``).
      exclude: variables never penalized: a list of variables or paths, or a predicate
        ``fn(variable) -> bool``.
      curvature: ``"diagonal"`` (the diagonal Fisher), ``"kfac"``: Kronecker-factored
        blocks A ⊗ G for Dense, convolution and EinsumDense layers
        (:func:`fastewc.kfac_fisher`), the diagonal for the other variables, or ``"ekfac"``:
        those blocks' eigenbases with second moments re-estimated in them
        (:mod:`fastewc.blocks.ekfac`).
      damping: δ ≥ 0 (``"kfac"`` and ``"ekfac"``): for KFAC the factored Tikhonov damping
        of every Kronecker term, (A + π√δ I) ⊗ (G + √δ/π I)
        (:func:`fastewc.kronecker.damped_factors`); for EKFAC S + δ, i.e. F + δI.  Default 0:
        nothing is inverted, so no damping is needed.  Settable later.
      kfac_sum: how tasks add up in ``mode="online"`` (``"kfac"`` only): ``"exact"`` keeps a
        term per task, ``"nearest"`` one term per layer, the nearest Kronecker product to the
        decayed sum (:mod:`fastewc.kfac_penalty`).  ``mode="separate"`` is always exact.

    Memory: 2 float32 per penalized parameter, plus d'² + u² + d'u per Kronecker term.

    Example::

        ewc = fastewc.EWC(model, lam=100.0)
        ewc.consolidate((x_a, y_a), loss="sparse_categorical_crossentropy")
        with tf.GradientTape() as tape:
            loss = loss_fn(y_b, model(x_b, training=True)) + ewc.penalty()

    A ``tf.function`` that calls :meth:`penalty` must be traced again after a task that
    changes the penalty's structure (a new term or head): an older trace raises (NaN under
    XLA); :func:`fastewc.make_train_step` and :class:`fastewc.EWCModel` retrace themselves.
    """

    _TF_MODULE_IGNORED_PROPERTIES = frozenset(tf.Module._TF_MODULE_IGNORED_PROPERTIES | {
        "_tracking", "_lock", "state_guard", _ESTIMATORS, "_structure"})

    def __init__(self, model, *, lam, mode="separate", gamma=1.0, exclude=None, curvature="diagonal",
                 damping=0.0, kfac_sum="exact"):
        super().__init__(name="ewc")
        self._configure(model, exclude, lam=lam, mode=mode, gamma=gamma, curvature=curvature,
                        damping=damping, kfac_sum=kfac_sum)
        self._track_new_variables()
        self._sync_structure()

    def _configure(self, model, exclude, **settings):
        self._state = State(**settings, on_restore=self._restore_checkpoint)   # checks them first
        object.__setattr__(self, "_tracking", Tracking(model, exclude))
        object.__setattr__(self, "_lock", threading.RLock())
        object.__setattr__(self, "state_guard", ReadersWriterLock())   # steps shared, commits exclusive
        object.__setattr__(self, "_structure", StructureGuard())

    # -- configuration ---------------------------------------------------------------
    @property
    def model(self):
        """The model; assign a new one that contains the tracked variables (e.g. a
        functional model rebuilt with a new head on the same layers) to move the state."""
        return self._tracking.model

    @model.setter
    def model(self, model):
        with self._lock:
            self._tracking.move_to(model, self._tracked())
            _cache.owned_cache(self, _ESTIMATORS).clear()    # they belong to the previous model

    mode = property(lambda self: MODES[int(self._state._mode_index.numpy())])
    gamma = property(lambda self: float(self._state._gamma.numpy()))
    kfac_sum = property(lambda self: KFAC_SUMS[int(self._state._kfac_sum_index.numpy())])
    _const = property(lambda self: self._state._const)
    curvature = property(lambda self: CURVATURES[int(self._state._curvature_index.numpy())],
                         doc="What :meth:`consolidate` computes for each task (``KINDS``' key).")

    lam = property(lambda self: float(self._state._lam.numpy()),
                   lambda self, value: self._state._lam.assign(check_lam(value)))
    damping = property(lambda self: float(self._state._damping.numpy()), lambda self, value: self._state._damping.assign(
        blocks.check_options(self.curvature, value, self.kfac_sum, self.mode)),
        doc="δ ≥ 0, the Tikhonov damping of the Kronecker and EKFAC terms (settable).")

    @property
    def num_tasks(self):
        """Number of consolidated tasks (an int; a tensor inside ``tf.function``)."""
        count = self._state._num_tasks
        return int(count.numpy()) if tf.executing_eagerly() else count.read_value()

    def _tracked(self):
        return self._state.variables(blocks.BASE)

    @property
    def tracked_paths(self):
        """The tracked variables' keys (paths relative to the model), in state order.
        Only grows: a compiled step that penalizes the state retraces when it does."""
        return list(self._tracked())

    def state(self):
        """``{path: (A, μ)}``: copies of the per-variable state as float32 NumPy arrays."""
        with self._lock:
            return blocks.BASE.snapshot(self._tracked())

    def kronecker_state(self):
        """``{(kernel path, bias path or None): [(c, A, G, W̄*)]}``: copies of the Kronecker
        terms (``curvature="kfac"``) as float32 NumPy arrays (:mod:`fastewc.kfac_penalty`)."""
        with self._lock:
            kind = blocks.KINDS["kfac"]
            return kind.snapshot(self._state.variables(kind))

    @property
    def structure_token(self):
        """``(tracked variables, Kronecker terms, version)``: changes with the penalty's
        structure (a compiled step that penalizes the state retraces then)."""
        return (len(self._tracked()), self._state.num_terms, self._structure.count)

    def _sync_structure(self):
        if self._structure.sync(self._state.structure()):
            self._tracking.invalidate()

    state_bytes = property(lambda self: self._state.state_bytes, doc="Bytes of state: every block's "
                           "float32 fields (2 per tracked parameter; 1 + d'² + u² + d'u per Kronecker term).")

    def __repr__(self):
        values = {name: getattr(self, name) for kind in blocks.kinds_of(self.curvature) for name in kind.OPTIONS}
        options = "".join(f" {k}={v!r}" if isinstance(v, str) else f" {k}={v:g}" for k, v in values.items())
        curvature = f" curvature={self.curvature!r}{options}" if options else ""
        return (f"<fastewc.EWC mode={self.mode!r} lam={self.lam:g} gamma={self.gamma:g}{curvature} "
                f"num_tasks={self.num_tasks} variables={len(self._tracked())}>")

    def _track_new_variables(self):
        """Zero state for every new trainable, not excluded variable of the model."""
        if self._state.track(self._tracking):
            self._tracking.invalidate()

    # -- checkpoints (tf.train.Checkpoint) ------------------------------------------------
    def _trackable_children(self, save_type="checkpoint", **kwargs):
        if save_type != "checkpoint":
            return super()._trackable_children(save_type, **kwargs)
        return self._state.checkpoint_children()

    def _lookup_dependency(self, name, cached_dependencies=None):
        state = self.__dict__.get("_state")
        child = None if state is None else state.checkpoint_children().get(name)
        return child if child is not None else super()._lookup_dependency(name, cached_dependencies)

    def _restore_checkpoint(self, values):
        """Make the state exactly the checkpoint's (``values``: every EWC tensor of the
        restore), everything checked first (:meth:`fastewc.blocks.store.State.staged`)."""
        with self._lock:
            staged = self._state.staged(values, self._tracking)
            with self.state_guard.exclusive():      # no train step reads a half-restored state
                self._state.assign_staged(*staged)
                self._track_new_variables()
                self._tracking.invalidate()
                self._sync_structure()

    # -- the penalty -----------------------------------------------------------------
    def _plan(self):
        """The :class:`fastewc._tracking.PenaltyPlan` (cached)."""
        return self._tracking.plan(self._state, blocks.BASE, self.structure_token)

    def penalty_is_active(self):
        """A bool tensor: λ > 0 and at least one task consolidated.  When False the
        penalty and its gradient are exactly 0, so a train step can skip them
        (``tf.cond``); works eagerly and inside ``tf.function``."""
        return tf.logical_and(self._state._lam > 0, self._state._num_tasks > 0)

    def _value_and_grads(self, inline=False, with_value=True):
        """(value, grads along ``model.trainable_variables``) of every block, from one
        compiled function; under the state lock eagerly (one consistent state)."""
        with self._lock if tf.executing_eagerly() else contextlib.nullcontext():
            plan, state = self._plan(), self._state
            lam = self._structure.guarded(tf.cast(state._lam, tf.float32), inline)
            return _penalty_over_blocks(plan.blocks, plan.trainable, lam, tf.cast(state._const, tf.float32),
                                        tf.cast(state._damping, tf.float32), inline=inline,
                                        with_value=with_value)

    def penalty(self):
        """λ/2 Σ_i A_i (θ_i − μ_i)² + λc/2 + the Kronecker blocks' terms: a float32 scalar
        with the analytic gradient (``tf.custom_gradient``); separate mode: exactly
        Σ_t λ/2 Σ_i F_t,i (θ_i − θ_t,i)².  0 before the first task.  Eager, in ``tf.function``,
        under XLA; a value not finite in float32 raises, naming the block (not under XLA)."""
        return self._value_and_grads()[0]

    def penalty_and_gradients(self, *, inline=False):
        """``(penalty(), penalty_gradients())`` from ONE compiled function.  ``inline=True``
        traces it into the calling graph without the custom gradient: for train steps that
        add the gradients themselves (:func:`fastewc.penalty.ewc_penalty_and_gradients`)."""
        return self._value_and_grads(inline=inline)

    def penalty_gradients(self):
        """The penalty's gradient (λ·A·(θ − μ) on the diagonal) for each of
        ``model.trainable_variables`` (float32; zeros for variables not penalized),
        computed without a tape: add them to a train step's gradients."""
        return self._value_and_grads(with_value=False)[1]

    # -- consolidation ---------------------------------------------------------------
    def consolidate(self, data, *, loss, kind="exact", method="auto", batch_size=None, rules=None,
                    num_samples=1, seed=None, jit_compile=None, verbose=0, max_examples=None,
                    model=None, positions="sum"):
        """Consolidate the task ``data``: its Fisher (of this EWC's ``curvature``) at the
        current weights, then the current weights become this task's anchor (:meth:`add_task`).

        ``model``: None, or a sub-model on the EWC model's layers whose output is this
        task's (one head); F = 0 for the variables it does not use.  The Fisher comes from a
        :class:`fastewc.FisherEstimator` kept per configuration (see
        :func:`fastewc.fisher_diagonal`), so task after task plans and traces once; ``seed``,
        ``verbose`` and ``max_examples`` are per call.  All or nothing and thread-safe (the
        lock is held from the Fisher to the commit).  Then the free memory the C allocator
        kept from the Fisher's transients goes back to the system
        (:func:`fastewc._allocator.release_free_memory`).  Returns
        the Fisher (a list, or a :class:`fastewc.KroneckerFisher` with ``curvature="kfac"``).
        """
        self._require_eager("consolidate")
        with self._lock:
            if self.model.built:
                self._tracking.check_present(self._tracked())
            source = self._tracking.task_model(model)
            estimator = self._estimator(source, loss=loss, kind=kind, method=method,
                                        batch_size=batch_size, rules=rules,
                                        num_samples=num_samples, jit_compile=jit_compile,
                                        curvature=self.curvature, positions=positions)
            fisher = estimator(data, seed=seed, verbose=verbose, max_examples=max_examples)
            self.add_task(fisher, model=model)
        _allocator.release_free_memory()
        return fisher

    def _estimator(self, model, **config):
        """This EWC's :class:`fastewc.FisherEstimator` of ``model`` for ``config`` (made on
        first use; dropped with the EWC, or when :attr:`model` is reassigned)."""
        from fastewc import fisher   # ewc -> fisher, lazily

        return fisher.estimator_for(model, owner=self, **config)

    def add_task(self, fisher, anchors=None, *, model=None):
        """Absorb a task whose Fisher is already known.

        Args:
          fisher: the Fisher estimator's result for this EWC's curvature: the list aligned
            with ``model.trainable_variables`` (:func:`fastewc.fisher_diagonal`), F ≥ 0 and
            finite, or a :class:`fastewc.KroneckerFisher` with ``curvature="kfac"``.
          anchors: the task's weights θ_t, aligned the same way; None: the current weights.
          model: None (the EWC's model), or the sub-model ``fisher`` was computed over.

        Each kind merges the task into its blocks (:mod:`fastewc.blocks`; separate:
        (A, μ, c) ← merge_separate(A, μ, F, θ_t), online: (A, μ) ← (γA + F, θ_t)).  Tracked
        variables the task does not train get F = 0 at their current weights.  All or
        nothing, under the lock; the commit holds ``state_guard`` exclusively.
        """
        self._require_eager("add_task")
        with self._lock:
            source = self._tracking.task_model(model)
            task = blocks.task(self.curvature, fisher, anchors, source, self._tracking)
            self._tracking.check_present(self._tracked(), task.by_key)
            merged = self._state.merge(task, blocks.kinds_of(self.curvature), self._tracking)
            with self.state_guard.exclusive():   # no train step runs during the commit
                try:
                    self._state.commit(*merged)
                finally:
                    self._tracking.invalidate()
                    self._sync_structure()

    @staticmethod
    def _require_eager(what):
        if not tf.executing_eagerly():
            raise RuntimeError(f"EWC.{what}() runs eagerly (it reads data and may create state); "
                               "call it outside tf.function.")

    # -- save / load -----------------------------------------------------------------
    def save(self, path):
        """Write the state to ``path`` (an .npz file, :mod:`fastewc.ewc_file`), atomically:
        the settings, the task count, c and each kind's blocks, with a SHA-256 of it all."""
        self._require_eager("save")
        with self._lock:            # one consistent snapshot, even under a concurrent consolidate
            contents = self._state.file_contents(self._tracking.excluded_paths())
        ewc_file.write(path, contents)

    @classmethod
    def load(cls, path, model, *, exclude=None):
        """An EWC for ``model`` with the state saved at ``path`` by :meth:`save`.

        The file is read and verified (format, SHA-256, shapes) and matched against
        ``model`` by each kind (every saved variable exists with the saved shape, is not
        excluded) before anything is built: a mismatch or a damaged file raises a
        ValueError, and nothing is returned half loaded.  ``exclude`` defaults to the
        variables excluded when the file was saved.  The saved variables are tracked in the
        file's order, then any other trainable variable of ``model`` with zero state.
        """
        contents = ewc_file.read(path)
        path = os.fspath(path)
        settings = file_settings(contents, path)
        check_model(model, trainable=False)
        if exclude is None:
            saved = set(contents.excluded)
            exclude = lambda v: v.path in saved or _relative_path(model, v) in saved  # noqa: E731
        ewc = cls.__new__(cls)
        super(EWC, ewc).__init__(name="ewc")
        ewc._configure(model, exclude, **settings)
        ewc._state.load(contents, ewc._tracking, path)
        ewc._track_new_variables()
        ewc._sync_structure()
        return ewc
