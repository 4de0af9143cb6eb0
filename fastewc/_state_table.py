"""A checkpointable ``{key: tf.Variable}`` table that never defers a restore."""
import tensorflow as tf


class StateTable(tf.Module):
    """One kind of per-variable state (A or μ): ``{key: tf.Variable}``, checkpointed by key
    (the layout of a plain dict attribute: ``ewc/_fisher/<key>``).

    A checkpoint restore looks every saved key up with :meth:`_lookup_dependency`.  A key
    that is not here is asked of the owning EWC (``resolve(key)``), which creates its state
    from the model or raises: TF never holds a deferred restoration for EWC state (it would
    assign the saved value whenever the variable is created later, over newer state).
    """

    _TF_MODULE_IGNORED_PROPERTIES = frozenset(
        tf.Module._TF_MODULE_IGNORED_PROPERTIES | {"_resolve"})

    def __init__(self, name, resolve):
        super().__init__(name=name)
        object.__setattr__(self, "_items", {})        # found by tf.Module.variables
        object.__setattr__(self, "_resolve", resolve)

    # -- the checkpoint view -------------------------------------------------------------
    def _trackable_children(self, *args, **kwargs):
        return dict(self._items)

    def _lookup_dependency(self, name, cached_dependencies=None):
        if name not in self._items:
            self._resolve(name)                      # creates the state or raises
        return self._items[name]

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
