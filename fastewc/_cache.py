"""Caches that live exactly as long as the object they belong to.

A cache is an attribute of its owner (as Keras keeps ``model.train_function`` on the
model), never a module-level table: a global ``WeakKeyDictionary`` whose values are
compiled functions that close over the key keeps the key alive forever.  Owner and
cache form an ordinary reference cycle that the garbage collector frees together.

The cache is not part of the owner's state: it is skipped by Keras' attribute tracking,
and a copy or a pickle of the owner starts with an empty one.

The package's caches: the Fisher estimators (:data:`FISHER_ESTIMATORS`, by model and
configuration, :func:`fastewc.fisher.estimator_for`) on a model (``fisher_diagonal``'s) or on
an EWC (its ``consolidate``'s), and a model's capture lock (:func:`fastewc.capture.model_lock`).
"""
import threading

_CREATE = threading.Lock()
FISHER_ESTIMATORS = "_fastewc_fisher_estimators"


class OwnedCache(dict):
    """A dict that copies and pickles as empty."""

    def __copy__(self):
        return OwnedCache()

    def __deepcopy__(self, memo):
        return OwnedCache()

    def __reduce__(self):
        return (OwnedCache, ())


def owned_cache(owner, name):
    """The :class:`OwnedCache` stored on ``owner`` as ``name`` (made on first use)."""
    cache = owner.__dict__.get(name)
    if cache is None:
        with _CREATE:                            # two threads' first use: one cache
            cache = owner.__dict__.get(name)
            if cache is None:
                cache = OwnedCache()
                object.__setattr__(owner, name, cache)   # not a tracked Keras / tf.Module attribute
    return cache


def cached(owner, name, key, make):
    """The value kept under ``key`` in ``owner``'s cache ``name``: ``make()`` on first use,
    then the same object for as long as ``owner`` lives (two threads' first use: both get
    the one that was stored first)."""
    cache = owned_cache(owner, name)
    value = cache.get(key)
    if value is None:
        value = cache.setdefault(key, make())
    return value
