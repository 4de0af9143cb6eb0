"""Where ``data`` enters the Fisher: validated, counted, cast, label-checked and batched
ONCE, so the engines receive batches that need no further checks.

:class:`Source` wraps ``data`` (a tuple ``(x, y)`` or ``(x, y, sample_weight)`` of
arrays/tensors, or a ``tf.data.Dataset`` of such batches, as Keras' ``fit`` takes them;
``sample_weight`` weighs each example or each output position, see
:mod:`fastewc.likelihood`): it checks its structure and sizes at
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
are checked by the likelihood (:meth:`fastewc.likelihood.Likelihood.check_labels`);
Embedding ids are checked on the compiled side (:class:`fastewc.engines.base.IdGuard`),
with the message of :func:`id_range_error`.

How much is read: all of ``data`` by default; ``max_examples=n`` reads its first n
examples.  A ``tf.data.Dataset`` of INFINITE cardinality needs ``max_examples``; one of
UNKNOWN cardinality (a generator, a ``filter``, which may be endless) is read up to
``max_examples`` or, without it, up to ``UNKNOWN_CARDINALITY_MAX_EXAMPLES`` examples, with
a warning when the dataset had more (the Fisher is then the mean over those first ones).
"""
import numbers
import typing
import warnings

import keras
import numpy as np
import tensorflow as tf

from fastewc import _keras_compat as compat


# What a dataset of unknown cardinality is read up to when no `max_examples` is given: an
# endless stream (``ds.repeat().filter(f)``) must end, and a Fisher over 10^5 examples is
# already an average over more examples than its variance needs.
UNKNOWN_CARDINALITY_MAX_EXAMPLES = 100_000


class Batch(typing.NamedTuple):
    x: object           # tensor (or nest of tensors), leading dim B, cast for the model
    y: object           # checked labels, leading dim B; (labels, sample_weight) with weights
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
    """``data`` checked once.  ``num_examples`` is known for arrays, None for datasets.

    ``max_examples``: None (all of ``data``; at most ``UNKNOWN_CARDINALITY_MAX_EXAMPLES``
    of a dataset of unknown cardinality, with a warning if it had more) or a positive int
    (the first ``max_examples`` examples)."""

    def __init__(self, data, max_examples=None):
        if max_examples is not None and (
                isinstance(max_examples, bool) or not isinstance(max_examples, numbers.Integral)
                or max_examples <= 0):
            raise ValueError("`max_examples` must be None or a positive integer. "
                             f"Received: max_examples={max_examples!r}")
        self.data = data
        self.is_dataset = isinstance(data, tf.data.Dataset)
        self.truncated = False              # set by batches(): more examples than read
        if self.is_dataset:
            unknown = _check_dataset(data, max_examples)
            self.num_examples = None
            self.max_examples = max_examples if max_examples is not None or not unknown \
                else UNKNOWN_CARDINALITY_MAX_EXAMPLES
            self._warn_if_truncated = unknown and max_examples is None
            x_spec = data.element_spec[0]
            self.has_weights = len(data.element_spec) == 3
            weight_spec = data.element_spec[2] if self.has_weights else None
            shape = None if weight_spec is None else weight_spec.shape
            self.weight_tail = tuple(shape[1:]) if shape is not None and shape.rank and \
                all(d is not None for d in shape[1:]) else None
            self.signature = (structure_key(x_spec), tuple(
                (tuple(s.shape[1:]), s.dtype.name) for s in tf.nest.flatten(x_spec)),
                None if weight_spec is None else weight_spec.shape.rank)
        else:
            n = _check_pair(data)
            self.num_examples = n if max_examples is None else min(n, int(max_examples))
            self._length = n
            self.max_examples = max_examples
            self._warn_if_truncated = False
            x = data[0]
            self.has_weights = len(data) == 3
            self.weight_tail = tuple(np.shape(data[2])[1:]) if self.has_weights else None
            self.signature = (structure_key(x), tuple(_leaf_spec(t) for t in tf.nest.flatten(x)),
                              np.ndim(data[2]) if self.has_weights else None)
        self._first_x = None

    @property
    def first_x(self):
        """A one-example slice of the inputs (tensors), for planning."""
        if self._first_x is None:
            if self.is_dataset:
                for element in self.data.take(1):
                    self._first_x = tf.nest.map_structure(lambda t: t[:1], element[0])
                    break
                else:
                    raise ValueError("`data` is empty: expected at least one example. Received: "
                                     "a dataset with 0 examples")
            else:
                self._first_x = tf.nest.map_structure(lambda t: tf.convert_to_tensor(t[:1]), self.data[0])
        return self._first_x

    def batches(self, rows, cast, check_labels, check_weights=None, *, padding=None):
        """Yield :class:`Batch` objects of ``rows_per_batch(rows, n)`` rows, inputs cast by
        ``cast``, labels passed through ``check_labels`` and a ``sample_weight`` through
        ``check_weights`` (NumPy in, NumPy out; None: as given); at most ``max_examples``
        examples in all; a short batch padded by ``padding`` (a :class:`Padding`, whose
        index tensors its owner keeps between calls; None: made for this read).  A batch's
        tensors hold NumPy data without a defensive copy
        (:func:`fastewc._keras_compat.call_tensor`): they are for the call that reads them,
        which ends before the caller can change its arrays."""
        padding = Padding() if padding is None else padding

        def finish(x, y, n, b, index, w=None):
            y = compat.call_tensor(check_labels(_numpy(y)))
            if w is not None:
                w = _numpy(w)
                y = (y, compat.call_tensor(w if check_weights is None else check_weights(w)))
            return padding.batch(cast(x), y, n, b, index)

        if self.is_dataset:
            limit = self.max_examples
            stream = self.data.unbatch()
            if limit is not None:
                # One example more than the bound tells whether the dataset had more.
                stream = stream.take(limit + 1 if self._warn_if_truncated else limit)
            b, index, seen = None, -1, 0
            for index, element in enumerate(stream.batch(rows)):
                n = _num_rows(element[0])
                if limit is not None and seen + n > limit:
                    self.truncated = True
                    n = limit - seen
                    if n == 0:
                        break
                    element = tf.nest.map_structure(lambda t: t[:n], element)
                seen += n
                b = rows_per_batch(rows, n) if b is None else b
                yield finish(*element[:2], n, b, index, *element[2:])
            if index < 0:
                raise ValueError("`data` is empty: expected at least one example. Received: a dataset with 0 examples")
            if self.truncated:
                warnings.warn(
                    f"fastewc: `data` is a tf.data.Dataset of unknown cardinality (it may be endless, "
                    f"e.g. .repeat().filter(...)); the Fisher read its first {limit} examples, the "
                    "default bound, and it had more. Pass max_examples=n to read n examples (or "
                    "tf.data.experimental.assert_cardinality if it is finite).", stacklevel=3)
            return
        x_all, y_all = self.data[:2]
        w_all = self.data[2] if self.has_weights else None
        n_total = self.num_examples
        b = rows_per_batch(rows, n_total)
        nested = self.signature[0] is not None
        for index, start in enumerate(range(0, n_total, b)):
            stop = min(start + b, n_total)
            whole = start == 0 and stop == self._length        # one batch: no slicing
            take = compat.call_tensor if whole else (lambda t: compat.call_tensor(t[start:stop]))
            x = tf.nest.map_structure(take, x_all) if nested else take(x_all)
            yield finish(x, y_all if whole else y_all[start:stop], stop - start, b, index,
                         None if w_all is None else w_all if whole else w_all[start:stop])

    def steps(self, rows):
        """Number of batches, if known."""
        n = self.num_examples
        return None if n is None else -(-n // rows_per_batch(rows, n))

    def inputs_finite(self):
        """Whether every float input that was read is finite (asked only once a Fisher is not)."""
        if self.is_dataset:
            batches = self.data if self.max_examples is None else \
                self.data.unbatch().take(self.max_examples).batch(4096)
        else:
            x = self.data[0]
            n = self.num_examples
            batches = [self.data] if n == self._length else [(tf.nest.map_structure(lambda t: t[:n], x),)]
        for element in batches:
            x = element[0]
            for t in tf.nest.flatten(x):
                t = tf.convert_to_tensor(t)
                if t.dtype.is_floating and not bool(tf.reduce_all(tf.math.is_finite(t))):
                    return False
        return True


def _numpy(t):
    return t.numpy() if isinstance(t, tf.Tensor) else np.asarray(t)


def _num_rows(x):
    return int(tf.nest.flatten(x)[0].shape[0])


def _check_pair(data):
    batches = isinstance(data, list) and _looks_like_batches(data)
    weighted = isinstance(data, tuple) and len(data) == 3
    if not isinstance(data, (tuple, list)) or (len(data) != 2 and not weighted):
        raise ValueError(
            "`data` must be a tuple (x, y) or (x, y, sample_weight) of arrays or tensors, or a "
            f"tf.data.Dataset yielding such batches. Received: data of type {type(data).__name__}"
            + (f" with {len(data)} elements" if isinstance(data, (tuple, list)) else "")
            + ("; wrap a Python generator or iterator in tf.data.Dataset.from_generator"
               if hasattr(data, "__next__") else "")
            + (": a list of (x, y) batches is not accepted; concatenate them, or pass "
               "tf.data.Dataset.from_generator(...) / a dataset of batches"
               if batches else ""))
    x, y = data[:2]
    if batches:
        raise ValueError(
            "`data` must be one (x, y) pair of arrays or tensors, or a tf.data.Dataset yielding "
            "(x, y) batches. Received: a list of 2 (x, y) batches; concatenate them, or pass a "
            "tf.data.Dataset of batches")
    leaves = tf.nest.flatten(x)
    for name, leaf in [("x", t) for t in leaves] + [("y", y)]:
        _check_dense(name, leaf)
    if isinstance(x, (list, tuple, dict)) and any(_is_python_scalar(t) for t in leaves):
        raise ValueError(
            "`data` inputs (x) must be arrays or tensors with a leading batch dimension. Received: "
            f"x as a Python {type(x).__name__} whose items are "
            f"{'numbers' if all(_is_python_scalar(t) for t in leaves) else 'partly numbers'} "
            "(nested Python lists): a list is read as a list of model inputs, as in Keras. "
            "Convert it with np.asarray(x).")
    try:
        ny = int(np.shape(y)[0]) if np.ndim(y) else -1
    except ValueError as err:       # NumPy: "setting an array element with a sequence ..."
        items = f" with {len(y)} items" if isinstance(y, (list, tuple)) else ""
        raise ValueError(
            "`data` labels (y) must be one array or tensor (the Fisher needs one label per "
            f"example). Received: y of type {type(y).__name__}{items} that is not one array "
            f"(NumPy: {err}). A list of labels per output is not supported (the Fisher needs a "
            "model with one output); for (x, y) batches, concatenate them or pass a "
            "tf.data.Dataset.") from None
    if weighted:
        _check_dense("sample_weight", data[2])
        nw = int(np.shape(data[2])[0]) if np.ndim(data[2]) else -1
        if nw != ny:
            raise ValueError(
                "`data` sample_weight must have one row per example: shape (batch,) or (batch, "
                f"positions...). Received: sample_weight of shape {np.shape(data[2])} for {ny} examples")
    nx = {int(np.shape(t)[0]) if np.ndim(t) else -1 for t in leaves}
    if -1 in nx or ny == -1:
        raise ValueError("`data` arrays must have a leading batch dimension. "
                         f"Received: x shapes {[np.shape(t) for t in leaves]}, y shape {np.shape(y)}")
    if len(nx) != 1 or nx != {ny}:
        raise ValueError(
            "`data` x and y must have the same number of examples. "
            f"Received: x with {sorted(nx)} rows and y with {ny} rows")
    if ny == 0:
        raise ValueError("`data` is empty: expected at least one example. Received: 0 examples")
    return ny


def _looks_like_batches(data):
    """A list of two (x, y) pairs, e.g. ``[(x1, y1), (x2, y2)]``."""
    return all(isinstance(item, tuple) and len(item) == 2 and not _is_python_scalar(item[0])
               for item in data)


def _is_python_scalar(t):
    """A number (Python or NumPy scalar) or a string: what flattening nested lists yields."""
    return isinstance(t, (numbers.Number, np.generic, str, bytes))


_DATA_PARTS = {"x": "inputs (x)", "y": "labels (y)", "sample_weight": "sample_weight"}


def _check_dense(name, t):
    """Ragged and sparse tensors are refused with what they are and how to make them dense."""
    if isinstance(t, (tf.RaggedTensor, tf.SparseTensor)):
        kind = type(t).__name__
        what = ("its rows have different lengths" if kind == "RaggedTensor" else "it is sparse")
        fix = (f"{name}.to_tensor()" if kind == "RaggedTensor" else f"tf.sparse.to_dense({name})")
        raise ValueError(
            f"`data` {_DATA_PARTS[name]} must be dense arrays or tensors. "
            f"Received: {name} as a tf.{kind} of shape {tuple(t.shape)} ({what}). Make it dense "
            f"first, e.g. {fix}" + (" (an Embedding with mask_zero=True ignores the zero padding)."
                                    if kind == "RaggedTensor" else "."))


def _check_dataset(data, max_examples=None):
    """Checks a dataset's structure; returns whether its cardinality is UNKNOWN."""
    spec = data.element_spec
    if not isinstance(spec, tuple) or len(spec) not in (2, 3):
        raise ValueError(
            "`data` as a tf.data.Dataset must yield (x, y) or (x, y, sample_weight) batches. "
            f"Received: a dataset with element_spec={spec}")
    ranks = [s.shape.rank for s in tf.nest.flatten(spec) if hasattr(s, "shape")]
    if any(r is None or r == 0 for r in ranks):
        raise ValueError(
            "`data` as a tf.data.Dataset must yield (x, y) batches with a leading batch "
            "dimension (call .batch(n) on a dataset of single examples, and give "
            f"from_generator a shaped output_signature). Received: element_spec={spec}")
    cardinality = int(data.cardinality())
    if cardinality == int(tf.data.INFINITE_CARDINALITY) and max_examples is None:
        raise ValueError(
            "`data` is an infinite tf.data.Dataset (e.g. after .repeat()): the Fisher is a mean "
            "over a finite set of examples. Use .take(n) first, or pass max_examples=n. "
            "Received: cardinality=INFINITE")
    return cardinality == int(tf.data.UNKNOWN_CARDINALITY)


def id_range_error(layer, low, high, *, argument="data"):
    """The error for Embedding ids outside ``layer``'s table: [-input_dim, input_dim) is what
    ``keras.ops.take`` reads (negative ids count from the end); XLA would clamp the others
    silently to the first or last row, TensorFlow's CPU kernel raises."""
    n = int(layer.input_dim)
    received = f"ids in [{low}, {high}]" if low is not None else "ids outside that range"
    return ValueError(
        f"`{argument}` feeds layer '{layer.name}' ({type(layer).__name__}, input_dim={n}) ids "
        f"outside its table: ids must lie in [0, {n}) (negative ids down to -{n} count from the "
        f"end, as in keras.ops.take). Received: {received}")


class Padding:
    """The small index tensors that pad a short batch to the compiled call's ``b`` rows,
    made once per (n, b) and kept by their owner (a :class:`fastewc.FisherEstimator`: its
    calls meet a handful of (n, b) pairs, the last batch of each data size): the (b,) 0/1
    mask of n real rows and the (b,) row index i mod n.  A padded batch then costs one
    gather per tensor and no eager conversion."""

    def __init__(self):
        self._masks, self._rows = {}, {}

    def mask(self, n, b):
        """The (b,) float32 mask, 1 on the n real rows."""
        mask = self._masks.get((n, b))
        if mask is None:
            mask = self._masks[(n, b)] = tf.constant(np.arange(b) < n, tf.float32)
        return mask

    def pad(self, t, b):
        """``t`` of n rows padded to ``b`` by repeating its own rows (row i is row i mod n)."""
        n = int(t.shape[0])
        if n == b:
            return t
        rows = self._rows.get((n, b))
        if rows is None:
            rows = self._rows[(n, b)] = tf.constant(np.arange(b) % n, tf.int32)
        return tf.gather(t, rows)

    def batch(self, x, y, n, b, index):
        """The :class:`Batch` of ``x``, ``y`` (n rows) padded to ``b`` rows."""
        if n != b:
            x = tf.nest.map_structure(lambda t: self.pad(t, b), x)
            y = tf.nest.map_structure(lambda t: self.pad(t, b), y)
        return Batch(x=x, y=y, mask=self.mask(n, b), count=n, index=index)


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
