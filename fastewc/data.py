"""Stream ``data`` as fixed-size batches: memory does not grow with the number of examples.

Every batch handed to a compiled function has exactly ``B`` rows, so a final partial batch
never retraces nor recompiles: it is padded by repeating its own rows (finite values, valid
labels) and carries a 0/1 ``mask`` that removes the padding from every sum.

``B`` (:func:`rows_per_batch`) is ``batch_size`` when there are at least that many
examples; fewer examples n use the next power of two ≥ n.  So consolidating task after
task with data sets of different sizes reuses one compiled function (and one XLA
compilation) per bucket, at most log₂(batch_size) + 1 of them, instead of one per size.
For a ``tf.data.Dataset`` n is the size of its first re-batched batch.
"""
import dataclasses

import numpy as np
import tensorflow as tf


@dataclasses.dataclass
class Batch:
    x: object           # tensor (or nest of tensors), leading dim B
    y: object           # tensor, leading dim B
    mask: tf.Tensor     # (B,) float32, 1 for real rows
    count: int          # real rows
    index: int          # batch number, used to seed the sampled kind


def rows_per_batch(batch_size, n):
    """Rows of every compiled batch for n examples (see the module docstring)."""
    if n >= batch_size:
        return batch_size
    return min(batch_size, 1 << max(0, (n - 1).bit_length()))


def _num_rows(x):
    return int(tf.nest.flatten(x)[0].shape[0])


def _check_pair(data):
    if isinstance(data, tf.data.Dataset):
        return None
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


def _pad(t, b):
    n = int(t.shape[0])
    if n == b:
        return t
    idx = tf.range(b) % n
    return tf.gather(t, idx)


def num_examples(data):
    """Number of examples if known without iterating, else None."""
    if isinstance(data, tf.data.Dataset):
        return None
    return _check_pair(data)


def check_dataset(data):
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


def iterate(data, batch_size):
    """Yield :class:`Batch` objects of a fixed size; raise on empty data."""
    def finish(x, y):
        return x, tf.convert_to_tensor(y)

    if isinstance(data, tf.data.Dataset):
        check_dataset(data)
        stream = data.unbatch().batch(batch_size)
        b = None
        index = -1
        for index, (x, y) in enumerate(stream):
            n = _num_rows(x)
            if b is None:
                b = rows_per_batch(batch_size, n)
            x, y = finish(x, y)
            yield _make(x, y, n, b, index)
        if index < 0:
            raise ValueError("`data` is empty: expected at least one example. Received: a dataset with 0 examples")
        return

    n_total = _check_pair(data)
    x_all, y_all = data
    b = rows_per_batch(batch_size, n_total)
    for index, start in enumerate(range(0, n_total, b)):
        stop = min(start + b, n_total)
        x = tf.nest.map_structure(lambda t: tf.convert_to_tensor(t[start:stop]), x_all)
        x, y = finish(x, y_all[start:stop])
        yield _make(x, y, stop - start, b, index)


def _make(x, y, n, b, index):
    mask = tf.constant(np.arange(b) < n, tf.float32)
    if n != b:
        x = tf.nest.map_structure(lambda t: _pad(t, b), x)
        y = _pad(y, b)
    return Batch(x=x, y=y, mask=mask, count=n, index=index)
