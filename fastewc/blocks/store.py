"""One store for an EWC's state: its scalars and every block's variables, with one
transactional commit and one checkpoint view.

* Scalars (tf.Variables, checkpointed as ``ewc/<name>``): λ, γ, the mode, the task count,
  the separate-mode constant c (float64), the curvature, ``kfac_sum`` and the damping δ.
* Blocks: per kind name, ``{block key: [tf.Variable]}``, the block's flat float32 fields
  (its kind's state, :mod:`fastewc.blocks`); the i-th field of a block is checkpointed at
  the address ``kind.addresses(key, n)[i]`` = (table, table key), under the kind's table
  path (``ewc/_fisher/<key>``, ``ewc/_kronecker/_terms/<kernel>|<bias>|<t>|<field>``: the
  layout checkpoints have always had).

Writes are all or nothing: :meth:`State.commit` assigns a task's merged blocks (creating
the variables of new blocks and terms), then c and the task count, and on any exception
(an assignment failing half way, an interrupt) puts every value back and drops what it
created.  Restores stage every value first (:mod:`fastewc._state_table`): the owner's
``on_restore`` callback gets the whole checkpoint, validates it, and only then assigns
(:meth:`State.replace`).
"""
import numbers
import weakref

import numpy as np
import tensorflow as tf

from fastewc._checks import check_lam, check_one_of
from fastewc._state_table import Restorer, StateTable
from fastewc import ewc_file
from fastewc.blocks import BASE, KINDS, Settings, check_options, kinds_of
from fastewc.kfac_penalty import KFAC_SUMS

MODES = ("separate", "online")
CURVATURES = tuple(KINDS)
# name -> dtype; checkpointed as ``ewc/<name>`` (the attribute names).
SCALARS = {"_lam": tf.float64, "_gamma": tf.float64, "_mode_index": tf.int32, "_num_tasks": tf.int64,
           "_const": tf.float64, "_curvature_index": tf.int32, "_kfac_sum_index": tf.int32,
           "_damping": tf.float64}


def check_gamma(gamma, mode):
    if isinstance(gamma, bool) or not isinstance(gamma, numbers.Real) or not 0 <= gamma <= 1:
        raise ValueError(f"`gamma` must be a number in [0, 1]. Received: gamma={gamma!r}")
    if mode == "separate" and gamma != 1:
        raise ValueError(
            "`gamma` only applies to mode='online' (the decay of older tasks); with "
            f"mode='separate' leave it at 1.0. Received: gamma={gamma!r}")
    return float(gamma)


def check_settings(*, lam, mode, gamma, curvature, damping, kfac_sum):
    """The EWC's configuration checked (Keras-style errors): ``(lam, gamma, damping)``."""
    check_one_of("mode", mode, MODES)
    lam = check_lam(lam)
    gamma = check_gamma(gamma, mode)
    return lam, gamma, check_options(curvature, damping, kfac_sum, mode)


def file_settings(contents, path):
    """The settings of an :class:`fastewc.ewc_file.EWCFile` as State arguments, checked."""
    settings = dict(mode=contents.mode, gamma=contents.gamma, curvature=contents.curvature,
                    damping=contents.damping, kfac_sum=contents.kfac_sum)
    try:
        check_settings(lam=contents.lam, **settings)
        return dict(settings, lam=contents.lam, num_tasks=int(contents.num_tasks), const=float(contents.const))
    except (ValueError, TypeError) as err:
        raise ValueError(f"EWC file {path!r} has an invalid header: {err}") from None


class _Path(tf.Module):
    """A node of a nested checkpoint path (``_kronecker`` holding ``_terms``)."""
    _TF_MODULE_IGNORED_PROPERTIES = frozenset(tf.Module._TF_MODULE_IGNORED_PROPERTIES | {"_children"})

    def __init__(self, name):
        super().__init__(name=name.lstrip("_"))
        object.__setattr__(self, "_children", {})

    def _trackable_children(self, save_type="checkpoint", **kwargs):
        return dict(self._children)

    def _lookup_dependency(self, name, cached_dependencies=None):
        return self._children.get(name)


class State(tf.Module):
    """All of an EWC's state (module docstring).  ``on_restore(values)`` (held weakly if a
    bound method) validates and assigns a checkpoint's staged values."""

    _TF_MODULE_IGNORED_PROPERTIES = frozenset(
        tf.Module._TF_MODULE_IGNORED_PROPERTIES | {"_restorer", "_blocks", "_on_restore", "_children"})

    def __init__(self, *, lam, mode, gamma, curvature, damping, kfac_sum, num_tasks=0, const=0.0,
                 on_restore=None):
        lam, gamma, damping = check_settings(lam=lam, mode=mode, gamma=gamma, curvature=curvature,
                                             damping=damping, kfac_sum=kfac_sum)
        super().__init__(name="state")
        object.__setattr__(self, "_restorer", Restorer(self))
        object.__setattr__(self, "_on_restore", weakref.WeakMethod(on_restore)
                           if hasattr(on_restore, "__self__") else (lambda: on_restore))
        values = {"_lam": lam, "_gamma": gamma, "_mode_index": MODES.index(mode), "_num_tasks": num_tasks,
                  "_const": const, "_curvature_index": CURVATURES.index(curvature),
                  "_kfac_sum_index": KFAC_SUMS.index(kfac_sum), "_damping": damping}
        with tf.init_scope():
            for name, dtype in SCALARS.items():
                setattr(self, name, tf.Variable(values[name], dtype=dtype, trainable=False, name=name[1:]))
        restorer = self._restorer                        # the tables must not keep the owner alive
        tables, children = {}, {}
        for kind in KINDS.values():
            for table, path in kind.TABLES.items():
                tables[table] = StateTable(table, lambda key, table=table: restorer.entry((table, key)))
                *nodes, leaf = path.split("/")
                parent = children
                for node in nodes:
                    parent = parent.setdefault(node, _Path(node))._children
                parent[leaf] = tables[table]
        self._tables = tables
        object.__setattr__(self, "_children", children)
        object.__setattr__(self, "_blocks", {name: {} for name in KINDS})

    # -- reading ---------------------------------------------------------------------------
    def variables(self, kind):
        """``{key: [tf.Variable]}`` of ``kind``'s blocks (live; do not assign them)."""
        return self._blocks[kind.kind]

    def read(self, kind):
        """``{key: [tensor]}``: the current values of ``kind``'s blocks."""
        return {key: [v.read_value() for v in fields] for key, fields in self._blocks[kind.kind].items()}

    def structure(self):
        """What a trace of the penalty bakes in: every block and its number of fields."""
        return tuple((name, key, len(fields)) for name, blocks in self._blocks.items()
                     for key, fields in blocks.items())

    @property
    def num_terms(self):
        """The terms of the kinds that keep several per block (Kronecker terms)."""
        return sum(KINDS[name].num_terms(fields) for name, blocks in self._blocks.items()
                   for fields in blocks.values())

    @property
    def state_bytes(self):
        return sum(4 * int(np.prod(v.shape)) for blocks in self._blocks.values()
                   for fields in blocks.values() for v in fields)

    # -- writing ---------------------------------------------------------------------------
    def commit(self, pending, delta_const=0.0):
        """A task: assign ``pending`` = ``{kind name: {key: [values]}}`` (a block's fields
        never shrink here), add ``delta_const`` to c and count the task; all or nothing."""
        const, num_tasks = self._const.read_value(), self._num_tasks.read_value()
        saved, created = [], []
        try:
            self._assign(pending, saved, created)
            self._const.assign_add(delta_const)
            self._num_tasks.assign_add(1)
        except BaseException:
            for variable, value in reversed(saved):
                variable.assign(value)
            for name, key, i in reversed(created):
                self._drop(KINDS[name], key, i)
            self._const.assign(const)
            self._num_tasks.assign(num_tasks)
            raise

    def replace(self, kind, blocks, *, consume=False):
        """Make ``kind``'s blocks exactly ``blocks`` = ``{key: [values]}`` (checked):
        existing fields assigned (keys keep their order), missing ones created, the others
        (blocks and fields ``blocks`` lacks) dropped.  With ``consume`` each value's entry
        in ``blocks`` is set to None once its variable holds it, so a value ``blocks``
        alone refers to is freed then, not when the whole state exists."""
        for key in list(self._blocks[kind.kind]):
            self._drop(kind, key, len(blocks.get(key, ())))
        self._assign({kind.kind: blocks}, [], [], consume=consume)

    def settings(self):
        """The :class:`fastewc.blocks.Settings` a merge reads."""
        return Settings(MODES[int(self._mode_index.numpy())], float(self._gamma.numpy()),
                        KFAC_SUMS[int(self._kfac_sum_index.numpy())], float(self._const.numpy()))

    def merge(self, task, kinds, tracking):
        """``(pending, Δc)`` for :meth:`commit`: each of ``kinds`` merges ``task`` into its
        blocks (pure, :meth:`fastewc.blocks.base.Block.merge`); raises before any assignment."""
        settings, pending, delta_const = self.settings(), {}, 0.0
        for kind in kinds:
            pending[kind.kind], delta = kind.merge(self.read(kind), task, settings, tracking)
            delta_const += delta
        return pending, delta_const

    def track(self, tracking):
        """Base-kind blocks with zero state for every new trainable, not excluded variable
        of ``tracking``'s model (:meth:`fastewc._tracking.Tracking.new_trainable`); whether any."""
        new = tracking.new_trainable(self.variables(BASE))
        self._assign({BASE.kind: {tracking.key(v): BASE.zeros(v) for v in new}}, [], [])
        return bool(new)

    def _assign(self, pending, saved, created, consume=False):
        for name, blocks in pending.items():
            kind, store = KINDS[name], self._blocks[name]
            for key, values in blocks.items():
                fields = store.get(key, [])
                addresses = kind.addresses(key, len(values))
                for i, value in enumerate(values):
                    if i < len(fields):
                        saved.append((fields[i], fields[i].read_value()))
                        fields[i].assign(value)
                    else:
                        table, table_key, variable_name = addresses[i]
                        with tf.init_scope():
                            variable = tf.Variable(value, dtype=tf.float32, trainable=False, name=variable_name)
                        self._tables[table][table_key] = variable
                        fields = store.setdefault(key, fields)
                        fields.append(variable)
                        created.append((name, key, i))
                    if consume:
                        values[i] = value = None

    def _drop(self, kind, key, keep):
        """Drop the fields of block ``key`` from the ``keep``-th on (the block if none is left)."""
        fields = self._blocks[kind.kind].get(key, [])
        for table, table_key, _ in kind.addresses(key, len(fields))[keep:]:
            if table_key in self._tables[table]:        # `del`, not pop(): stays checkpointable
                del self._tables[table][table_key]
        del fields[keep:]
        if not fields:
            self._blocks[kind.kind].pop(key, None)

    # -- files -------------------------------------------------------------------------------
    def file_contents(self, excluded):
        """The :class:`fastewc.ewc_file.EWCFile` of this state (each kind's section)."""
        curvature = CURVATURES[int(self._curvature_index.numpy())]
        sections = {kind.FILE_FIELD: kind.to_file(self.variables(kind)) for kind in kinds_of(curvature)}
        return ewc_file.EWCFile(
            mode=MODES[int(self._mode_index.numpy())], lam=float(self._lam.numpy()),
            gamma=float(self._gamma.numpy()), num_tasks=int(self._num_tasks.numpy()),
            const=float(self._const.numpy()), excluded=excluded, curvature=curvature,
            damping=float(self._damping.numpy()), kfac_sum=KFAC_SUMS[int(self._kfac_sum_index.numpy())],
            state=sections.pop("state"), sections=sections)

    def load(self, contents, tracking, path):
        """Each kind's blocks from a file's ``contents``, all checked against the model
        (:meth:`fastewc.blocks.base.Block.from_file`) before any is created.

        Consumes ``contents``: once every block is checked, the sections it read are
        emptied, and each array is let go as soon as its variable holds it.  A load then
        holds the state plus the arrays not yet turned into variables, rather than two
        copies of the state at its end."""
        kinds = kinds_of(contents.curvature)
        loaded = {kind: kind.from_file(contents.section(kind.FILE_FIELD) or {}, tracking, path)
                  for kind in kinds}
        for kind in kinds:
            (contents.section(kind.FILE_FIELD) or {}).clear()
        for kind, blocks in loaded.items():
            self.replace(kind, blocks, consume=True)

    # -- checkpoints -------------------------------------------------------------------------
    def checkpoint_children(self):
        """The checkpoint view: each scalar as a staging entry, then the kinds' tables."""
        children = {name: self._restorer.entry(("scalar", name)) for name in SCALARS}
        children.update(self._children)
        return children

    def _checkpoint_value(self, address):
        """The live tensor a checkpoint entry saves (a scalar of its dtype if there is none)."""
        table, key = address
        if table == "scalar":
            return getattr(self, key).read_value()
        variable = self._tables[table].get(key)
        return tf.zeros([], tf.float32) if variable is None else variable.read_value()

    def _restore_checkpoint(self, values):
        self._on_restore()(values)

    def staged(self, values, tracking):
        """``(scalars, {kind: blocks})`` of a checkpoint's staged ``values`` = ``{(table,
        key): tensor}``: the settings valid, each kind's blocks checked against the model
        (:meth:`Block.from_checkpoint`); raises a ValueError naming the first mismatch.
        Nothing is assigned (:meth:`assign_staged`)."""
        scalars = {name: values[("scalar", name)] for name in SCALARS if ("scalar", name) in values}
        for name, value in scalars.items():
            if value.shape.rank != 0:
                raise ValueError(f"Cannot restore EWC state from the checkpoint: its '{name[1:]}' must "
                                 f"be a scalar. Received: shape {tuple(value.shape)}")
        header = {name: (scalars[name] if name in scalars else getattr(self, name)).numpy() for name in SCALARS}
        try:
            check_settings(mode=MODES[int(header["_mode_index"])], lam=float(header["_lam"]),
                           gamma=float(header["_gamma"]), damping=float(header["_damping"]),
                           curvature=CURVATURES[int(header["_curvature_index"])],
                           kfac_sum=KFAC_SUMS[int(header["_kfac_sum_index"])])
        except (ValueError, IndexError) as err:
            raise ValueError(f"Cannot restore EWC state from the checkpoint: invalid settings "
                             f"({err}).") from None
        tables = {}
        for (table, key), value in values.items():
            tables.setdefault(table, {})[key] = value
        return scalars, {kind: kind.from_checkpoint(tables, tracking, self.variables(kind))
                         for kind in KINDS.values()}

    def assign_staged(self, scalars, restored):
        for name, value in scalars.items():
            getattr(self, name).assign(value)
        for kind, blocks in restored.items():
            self.replace(kind, blocks)
