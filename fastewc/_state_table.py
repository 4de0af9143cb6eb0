"""The checkpoint view of EWC state: tables of ``{key: tf.Variable}`` whose checkpoint
children are staging :class:`Entry` objects, and the :class:`Restorer` that collects a
restore's values and hands them to the owner all at once.

Why staging.  TensorFlow restores a checkpoint object by object (each variable assigned as
its value is read), and only the objects the checkpoint names: state created after the
checkpoint was written would survive the restore, and a shape mismatch found on the k-th
variable would leave the first k − 1 assigned.  Here every checkpointed tensor of an EWC
(its scalars, each A and μ, each Kronecker term's fields) is an :class:`Entry`: saved as
the live variable's value under the same key a plain variable has
(``<path>/.ATTRIBUTES/VARIABLE_VALUE``, so checkpoints keep their layout), restored into a
staging dict.  When the last entry the restore bound has its value, the owner gets the
whole checkpoint state (``_restore_checkpoint(values)``): it validates everything, then assigns.

Completeness without relying on TF's restore order: TF binds every object of the restored
subtree (setting its ``_update_uid`` to the restore's id) before it reads any value, so
the entries of one restore are exactly those whose ``_update_uid`` is that id.
"""
import weakref

import tensorflow as tf
from tensorflow.python.trackable import base as trackable_base

VALUE_KEY = "VARIABLE_VALUE"          # the attribute name a tf.Variable is saved under


class Entry(trackable_base.Trackable):
    """One checkpointed tensor of EWC state, addressed ``(kind, key)``."""

    def __init__(self, restorer, address):
        self._maybe_initialize_trackable()
        self._restorer = restorer
        self.address = address

    def _serialize_to_tensors(self):
        # At save: the live value.  At restore TF calls this for the dtype only.
        return {VALUE_KEY: self._restorer.owner()._checkpoint_value(self.address)}

    def _restore_from_tensors(self, restored_tensors):
        self._restorer.stage(self, restored_tensors[VALUE_KEY])


class Restorer:
    """The entries of one owner and the values of the restore in progress.

    ``owner`` (held weakly) provides ``_checkpoint_value(address)`` (the live tensor, or a
    scalar of the right dtype for state it does not have) and ``_restore_checkpoint({address:
    tensor})``, which validates and assigns the checkpoint's state or raises.
    """

    def __init__(self, owner):
        self.owner = weakref.ref(owner)
        self._entries = {}
        self._staged = (None, {})     # (restore id, {address: tensor})

    def entry(self, address):
        entry = self._entries.get(address)
        if entry is None:
            entry = self._entries[address] = Entry(self, address)
        return entry

    def stage(self, entry, value):
        if not tf.executing_eagerly():
            raise RuntimeError(
                "fastewc.EWC state restores eagerly only: this checkpoint restore runs inside a "
                "tf.function (a multi-worker or custom-device restore). Restore the EWC with its "
                "own tf.train.Checkpoint(ewc=ewc) on one worker.")
        uid = entry._update_uid
        restore_id, values = self._staged
        if restore_id != uid:
            values = {}
            self._staged = (uid, values)
        values[entry.address] = value
        expected = [e.address for e in self._entries.values() if e._update_uid == uid]
        if all(address in values for address in expected):
            self._staged = (None, {})
            self.owner()._restore_checkpoint({address: values[address] for address in expected})


class StateTable(tf.Module):
    """One kind of per-variable state (A, μ or Kronecker term fields): ``{key:
    tf.Variable}``, checkpointed by key (the layout of a plain dict attribute:
    ``ewc/_fisher/<key>``) through the staging entries of ``entry_of(key)``.  A restore
    looking up a key this table does not hold gets its entry too: the owner decides at
    commit whether the key fits (TF never holds a deferred restoration for EWC state)."""

    _TF_MODULE_IGNORED_PROPERTIES = frozenset(
        tf.Module._TF_MODULE_IGNORED_PROPERTIES | {"_entry_of"})

    def __init__(self, name, entry_of):
        super().__init__(name=name)
        object.__setattr__(self, "_items", {})        # found by tf.Module.variables
        object.__setattr__(self, "_entry_of", entry_of)

    # -- the checkpoint view -------------------------------------------------------------
    def _trackable_children(self, save_type="checkpoint", **kwargs):
        if save_type != "checkpoint":
            return dict(self._items)
        return {key: self._entry_of(key) for key in self._items}

    def _lookup_dependency(self, name, cached_dependencies=None):
        return self._entry_of(name)

    # -- a dict ----------------------------------------------------------------------------
    def __getitem__(self, key):
        return self._items[key]

    def __setitem__(self, key, value):
        self._items[key] = value

    def __delitem__(self, key):
        del self._items[key]

    def __contains__(self, key):
        return key in self._items

    def __iter__(self):
        return iter(self._items)

    def __len__(self):
        return len(self._items)

    def get(self, key, default=None):
        return self._items.get(key, default)

    def keys(self):
        return self._items.keys()

    def values(self):
        return self._items.values()

    def items(self):
        return self._items.items()
