"""Where ``data`` enters the Fisher: validated, counted, cast, label-checked and batched
ONCE, so the engines receive batches that need no further checks.

:class:`Source` wraps ``data`` (a tuple ``(x, y)`` of arrays/tensors, or a
``tf.data.Dataset`` of ``(x, y)`` batches): it checks its structure and sizes at
construction, exposes the first example (for planning) and the input signature (for
selecting compiled functions), and :meth:`Source.batches` streams :class:`Batch` objects.

Fixed-size batches: every batch handed to a compiled function has exactly ``B`` rows, so
a final partial batch never retraces nor recompiles: it is padded by repeating its own
rows (finite values, valid labels) and carries a 0/1 ``mask`` that removes the padding
from every sum.  Memory does not grow with the number of examples.

``B`` (:func:`rows_per_batch`) is the engine's rows per call when there are at least that
many examples; fewer examples n use the next power of two ≥ n.  So consolidating task
after task with data sets of different sizes reuses one compiled function per bucket, at
most log₂(rows) + 1 of them, instead of one per size.  For a ``tf.data.Dataset`` n is the
size of its first re-batched batch.

Inputs are cast as Keras' ``fit``/``predict`` cast them (:func:`input_caster`); labels
are checked by the likelihood (:meth:`fastewc.likelihood.Likelihood.check_labels`).
"""
import typing

import keras
import numpy as np
import tensorflow as tf


class Batch(typing.NamedTuple):
    x: object           # tensor (or nest of tensors), leading dim B, cast for the model
    y: tf.Tensor        # checked labels, leading dim B
    mask: tf.Tensor     # (B,) float32, 1 for real rows
    count: int          # real rows
    index: int          # batch number, used to seed the sampled kind


def rows_per_batch(rows, n):
    """Rows of every compiled batch for n examples (see the module docstring)."""
    if n >= rows:
        return rows
    return min(rows, 1 << max(0, (n - 1).bit_length()))


def _leaf_spec(t):
    """(per-example shape, dtype name) of an array or tensor, without copying it."""
    dtype = getattr(t, "dtype", None)
    if dtype is None or not hasattr(t, "shape"):
        t = np.asarray(t)
        dtype = t.dtype
    try:
        name = tf.as_dtype(dtype).name
    except TypeError:
        name = str(dtype)
    return tuple(t.shape[1:]), name


def structure_key(x):
    """A hashable description of a nest's structure (tuple vs list vs dict and keys)."""
    if isinstance(x, dict):
        return ("dict",) + tuple((k, structure_key(x[k])) for k in sorted(x))
    if isinstance(x, (tuple, list)):
        return (type(x).__name__,) + tuple(structure_key(t) for t in x)
    return None


class Source:
    """``data`` checked once.  ``num_examples`` is known for arrays, None for datasets."""

    def __init__(self, data):
        self.data = data
        self.is_dataset = isinstance(data, tf.data.Dataset)
        if self.is_dataset:
            _check_dataset(data)
            self.num_examples = None
            x_spec = data.element_spec[0]
            self.signature = (structure_key(x_spec), tuple(
                (tuple(s.shape[1:]), s.dtype.name) for s in tf.nest.flatten(x_spec)))
        else:
            self.num_examples = _check_pair(data)
            x = data[0]
            self.signature = (structure_key(x), tuple(_leaf_spec(t) for t in tf.nest.flatten(x)))
        self._first_x = None

    @property
    def first_x(self):
        """A one-example slice of the inputs (tensors), for planning."""
        if self._first_x is None:
            if self.is_dataset:
                for x, _ in self.data.take(1):
                    self._first_x = tf.nest.map_structure(lambda t: t[:1], x)
                    break
                else:
                    raise ValueError("`data` is empty: expected at least one example. Received: "
                                     "a dataset with 0 examples")
            else:
                self._first_x = tf.nest.map_structure(lambda t: tf.convert_to_tensor(t[:1]), self.data[0])
        return self._first_x

    def batches(self, rows, cast, check_labels):
        """Yield :class:`Batch` objects of ``rows_per_batch(rows, n)`` rows, inputs cast by
        ``cast`` and labels passed through ``check_labels`` (NumPy in, NumPy out)."""
        def finish(x, y, n, b, index):
            y = tf.convert_to_tensor(check_labels(y.numpy() if isinstance(y, tf.Tensor) else np.asarray(y)))
            return _make(cast(x), y, n, b, index)

        if self.is_dataset:
            b, index = None, -1
            for index, (x, y) in enumerate(self.data.unbatch().batch(rows)):
                n = _num_rows(x)
                b = rows_per_batch(rows, n) if b is None else b
                yield finish(x, y, n, b, index)
            if index < 0:
                raise ValueError("`data` is empty: expected at least one example. Received: a dataset with 0 examples")
            return
        x_all, y_all = self.data
        n_total = self.num_examples
        b = rows_per_batch(rows, n_total)
        nested = self.signature[0] is not None
        for index, start in enumerate(range(0, n_total, b)):
            stop = min(start + b, n_total)
            whole = start == 0 and stop == n_total        # one batch: no slicing
            take = (lambda t: tf.convert_to_tensor(t)) if whole else \
                (lambda t: tf.convert_to_tensor(t[start:stop]))
            x = tf.nest.map_structure(take, x_all) if nested else take(x_all)
            yield finish(x, y_all if whole else y_all[start:stop], stop - start, b, index)

    def steps(self, rows):
        """Number of batches, if known."""
        n = self.num_examples
        return None if n is None else -(-n // rows_per_batch(rows, n))

    def inputs_finite(self):
        """Whether every float input is finite (asked only once a Fisher is not)."""
        batches = self.data if self.is_dataset else [self.data]
        for x, _ in batches:
            for t in tf.nest.flatten(x):
                t = tf.convert_to_tensor(t)
                if t.dtype.is_floating and not bool(tf.reduce_all(tf.math.is_finite(t))):
                    return False
        return True


def _num_rows(x):
    return int(tf.nest.flatten(x)[0].shape[0])


def _check_pair(data):
    if not isinstance(data, (tuple, list)) or len(data) != 2:
        raise ValueError(
            "`data` must be a tuple (x, y) of arrays or tensors, or a tf.data.Dataset yielding "
            f"(x, y) batches. Received: data of type {type(data).__name__}"
            + (f" with {len(data)} elements" if isinstance(data, (tuple, list)) else "")
            + ("; wrap a Python generator or iterator in tf.data.Dataset.from_generator"
               if hasattr(data, "__next__") else ""))
    x, y = data
    nx = {int(np.shape(t)[0]) if np.ndim(t) else -1 for t in tf.nest.flatten(x)}
    ny = int(np.shape(y)[0]) if np.ndim(y) else -1
    if -1 in nx or ny == -1:
        raise ValueError("`data` arrays must have a leading batch dimension. "
                         f"Received: x shapes {[np.shape(t) for t in tf.nest.flatten(x)]}, y shape {np.shape(y)}")
    if len(nx) != 1 or nx != {ny}:
        raise ValueError(
            "`data` x and y must have the same number of examples. "
            f"Received: x with {sorted(nx)} rows and y with {ny} rows")
    if ny == 0:
        raise ValueError("`data` is empty: expected at least one example. Received: 0 examples")
    return ny


def _check_dataset(data):
    spec = data.element_spec
    if not isinstance(spec, tuple) or len(spec) != 2:
        raise ValueError(
            "`data` as a tf.data.Dataset must yield (x, y) batches. "
            f"Received: a dataset with element_spec={spec}")
    ranks = [s.shape.rank for s in tf.nest.flatten(spec) if hasattr(s, "shape")]
    if any(r is None or r == 0 for r in ranks):
        raise ValueError(
            "`data` as a tf.data.Dataset must yield (x, y) batches with a leading batch "
            "dimension (call .batch(n) on a dataset of single examples, and give "
            f"from_generator a shaped output_signature). Received: element_spec={spec}")
    if int(data.cardinality()) == int(tf.data.INFINITE_CARDINALITY):
        raise ValueError(
            "`data` is an infinite tf.data.Dataset (e.g. after .repeat()): the Fisher is a mean "
            "over a finite set of examples. Use .take(n) first. Received: cardinality=INFINITE")


_MASKS = {}


def _mask(n, b):
    """The (b,) 0/1 mask of n real rows; cached (a handful of (n, b) pairs per run)."""
    key = (n, b)
    mask = _MASKS.get(key)
    if mask is None:
        mask = _MASKS[key] = tf.constant(np.arange(b) < n, tf.float32)
    return mask


def _pad(t, b):
    n = int(t.shape[0])
    if n == b:
        return t
    return tf.gather(t, tf.range(b) % n)


def _make(x, y, n, b, index):
    if n != b:
        x = tf.nest.map_structure(lambda t: _pad(t, b), x)
        y = _pad(y, b)
    return Batch(x=x, y=y, mask=_mask(n, b), count=n, index=index)


def input_caster(model, x, from_dataset):
    """Check the inputs ``x`` (a one-example slice) against ``model`` and return the cast
    applied to every batch, as Keras' ``fit``/``predict`` do: to the dtype of the model's
    declared ``Input`` (functional and Sequential models), else floating inputs of another
    precision (float64, float16) to ``keras.config.floatx()``; integers and bools pass
    unchanged.  Strings and complex numbers raise a TypeError; an input whose per-example
    shape does not match the declared one raises a ValueError, both naming ``data``."""
    leaves = tf.nest.flatten(x)
    for t in leaves:
        if not (t.dtype.is_floating or t.dtype.is_integer or t.dtype.is_bool):
            raise TypeError("`data` inputs must be real numbers (floating point, integer or bool). "
                            f"Received: x of dtype {t.dtype.name}")
    declared = list(getattr(model, "inputs", None) or []) if isinstance(model, keras.Model) else []
    if declared and len(declared) == len(leaves) and not isinstance(x, dict):
        targets = []
        for t, ref in zip(leaves, declared):
            shape, want = tuple(t.shape[1:]), tuple(ref.shape[1:])
            if len(shape) == len(want) + 1 and shape and shape[-1] == 1:
                shape = shape[:-1]                 # Keras squeezes a trailing 1 ...
            elif len(shape) == len(want) - 1 and want and want[-1] == 1:
                shape = shape + (1,)               # ... or adds one
            if len(shape) != len(want) or any(w is not None and s != w for s, w in zip(shape, want)):
                hint = (" A tf.data.Dataset must yield batches: call .batch(n) on a dataset of single "
                        "examples." if from_dataset and len(t.shape) < len(ref.shape) else "")
                raise ValueError(
                    f"`data` inputs do not fit model '{model.name}': expected x with per-example "
                    f"shape {want} (model input shape {tuple(ref.shape)}). Received: x with "
                    f"per-example shape {tuple(t.shape[1:])}.{hint}")
            targets.append(tf.as_dtype(ref.dtype))
    else:
        floatx = tf.as_dtype(keras.config.floatx())
        targets = [floatx if t.dtype.is_floating else None for t in leaves]
    if all(d is None or t.dtype == d for t, d in zip(leaves, targets)):
        return _identity

    def cast(x):
        flat = [t if d is None or t.dtype == d else tf.cast(t, d)
                for t, d in zip(tf.nest.flatten(x), targets)]
        return tf.nest.pack_sequence_as(x, flat)

    return cast


def _identity(x):
    return x
