"""From a Keras loss to the probabilistic model the Fisher is defined by.

The diagonal Fisher is built from per-example gradients of the negative log-likelihood
ℓ_n = −log p(y | x_n, θ).  All of them factor through the model output o_n:

    g_n(y) = J_nᵀ u_n(y),    u_n(y) = ∂ℓ(y, o_n)/∂o_n,    J_n = ∂o_n/∂θ.

So every kind of Fisher is described by a set of K output cotangents per example and
their weights, ``(U, W)`` with ``U`` of shape (K, N, *output) and ``W`` of shape (K, N):

    F = (1/N) Σ_n Σ_k W_kn (J_nᵀ U_kn)²

| kind        | K                    | U_kn                          | W_kn           |
|-------------|----------------------|-------------------------------|----------------|
| empirical   | 1                    | u_n(y_n), y_n the true label  | 1              |
| sampled     | num_samples          | u_n(ŷ_k), ŷ_k ~ p(·|x_n)      | 1/num_samples  |
| exact       | per family, below    | per family, below             | per family     |

The kinds are handled once, in :class:`Likelihood`; a family supplies only ℓ, how it
draws a label from noise, its exact cotangents and its label checks.  ℓ is always the
log-likelihood of the model, which is what the Fisher needs:

* :class:`Categorical` (sparse or one-hot cross-entropy): ℓ is Keras' cross-entropy
  itself, ``from_logits`` honoured.  Exact: the C outcomes u_n(c) weighted by p_c; for
  logits reduced to K = C − 1 unit-weight cotangents (:func:`drop_score_direction`).
* :class:`Bernoulli` (binary cross-entropy, D independent units): ℓ = Σ_j BCE_j, the SUM
  over output units (Keras averages them; the likelihood of D independent units sums).
  Exact: for each unit j and outcome b ∈ {0, 1}, weighted by p_j(b) (K = 2D); for logits
  reduced to one cotangent per unit (K = D).  The cross terms between units vanish in
  expectation, so this is the full expectation.
* :class:`Gaussian` (``"mse"``): a unit-variance Gaussian, ℓ = ½‖y − o‖² (Keras' MSE is
  the mean of the squares; the log-likelihood is half their sum).  Exact: K = D unit
  cotangents e_j, which gives diag(JᵀJ).  Sampled: ŷ = o + ε, ε ~ N(0, I).

Per-position outputs
--------------------
An output of shape (N, *positions, D) (a causal LM's (N, T, vocab), a tagger's, a
segmenter's (N, H, W, classes); binary/MSE (N, *positions, units)) is P = Π positions
independent outcomes per example: the classes or units are the last axis, the rest are
positions (binary/MSE: every element is a position when a weight covers every axis).
The example's negative log-likelihood is

    ℓ_n = c_n Σ_t s_nt ℓ_nt(y_nt),      c_n = 1 (``positions="sum"``, default)
                                        c_n = 1 / #{t: s_nt > 0} (``"mean"``)

with s_nt the product of the masks that reach position t (the Keras mask on the output,
keras_hub's ``x["padding_mask"]``, a ``sample_weight``; 1 without any).  A padded
position (s = 0) contributes nothing; an example with every position padded contributes
zero and still counts in N; a weight s enters the Fisher as s² (it scales the loss).
Since ℓ_nt depends on o_nt only, u_n = ∂ℓ_n/∂o_n is the per-position cotangents
c_n s_nt u_nt(y_nt) side by side, and the engine's one backward pass sums them inside
the example's gradient, g_n = Σ_t c_n s_nt J_ntᵀ u_nt:

* empirical: the true labels y_nt; sampled: one label per position drawn from its
  predictive p(·|x_n)_t (teacher-forced: the model sees x_n, not its own draws), each
  draw a whole labeling, K = num_samples.
* exact: the labels of the positions are independent given x_n and each score has mean
  zero, E[u_nt] = Σ_c p_tc u_nt(c) = 0, so for t ≠ t'

      E[(J_tᵀ u_t)_i (J_t'ᵀ u_t')_i] = (J_tᵀ E[u_t])_i (J_t'ᵀ E[u_t'])_i = 0,

  and E[g_n g_nᵀ] (its diagonal) = c_n² Σ_t s_nt² E[(J_ntᵀ u_nt)²]: the family's exact
  cotangents of each position, scaled by c_n s_nt and placed at that position (zero
  elsewhere), K = K_family · P backward passes per example.  Above
  ``MAX_EXACT_COTANGENTS`` (any output: 256 by default, :func:`set_max_exact_cotangents`)
  it raises before any work (:meth:`Likelihood.check_exact_cost`).

Keras trains on the mean over tokens, whose Fisher is 1/T² of the sum's per example
(T = #{t: s_t > 0}).  The sum is the default: it is the log-likelihood of the sequence,
so its Fisher is the probabilistic model's, additive over tokens, and what a
(N, classes) output already gives; ``"mean"`` is there for a penalty scaled like the
mean-over-tokens loss.  A loss's ``reduction`` plays no part: the Fisher is per example.

Probabilities (``from_logits=False``) keep all C / 2D outcomes: Keras clips them to
[ε, 1 − ε], and the clipped score no longer has mean zero, which the reduction needs.

Sampling is reproducible: the noise of batch b is drawn with
``tf.random.stateless_uniform`` / ``stateless_normal`` (alg="philox") at seed ``[seed, b]``,
always by TensorFlow's own kernels, never inside an XLA function (XLA's philox gives other
numbers for the same seed), so the draws are the same with and without ``jit_compile``
and in every engine; categorical labels come from the inverse CDF of p at
uniform noise of shape (num_samples, batch, *positions), Bernoulli outcomes from ``u < p`` and
Gaussian labels from o + ε, both with noise of shape (num_samples, batch, *output).
"""
import dataclasses
import math
import typing

import keras
import numpy as np
import tensorflow as tf

KINDS = ("empirical", "sampled", "exact")
POSITIONS = ("sum", "mean")
# The exact kind's most output cotangents (backward passes) per example by default; above,
# it raises before any work and suggests kind="sampled".  Exact costs about K times the
# empirical kind (K backward passes, K rows of per-example tensors per chunk): 10 or 100
# classes (K = 9, 99) run, an ImageNet head (K = 999) or a vocabulary over a sequence does
# not.  Read it with max_exact_cotangents(), raise it with set_max_exact_cotangents().
MAX_EXACT_COTANGENTS = 256


def max_exact_cotangents():
    """The exact kind's most backward passes per example (``MAX_EXACT_COTANGENTS``, 256
    unless :func:`set_max_exact_cotangents` changed it)."""
    return MAX_EXACT_COTANGENTS


def set_max_exact_cotangents(value):
    """Set the exact kind's most backward passes per example, for this process.

    ``kind="exact"`` needs K output cotangents per example (C − 1 for C classes from
    logits, C from probabilities, times the positions of a per-position output) and costs
    about K times the empirical kind; above this limit the planning pass raises before any
    work.  Raise it to run exact on a wider head knowingly (``set_max_exact_cotangents(999)``
    for 1000 classes: about 1000 backward passes per example), like ``keras.config``
    settings it holds for every later call in the process.
    """
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError("`max_exact_cotangents` must be an integer >= 1 (backward passes per example). "
                         f"Received: max_exact_cotangents={value!r}")
    global MAX_EXACT_COTANGENTS
    MAX_EXACT_COTANGENTS = int(value)


@dataclasses.dataclass(frozen=True)
class Likelihood:
    """The probabilistic model behind a Keras loss: the three kinds of Fisher, once.

    Subclasses (one per family) are frozen dataclasses and supply :meth:`nll`,
    :meth:`_sample`, :meth:`_exact`, :meth:`_num_exact`, :meth:`_noise_shape` /
    ``_draw``, :meth:`_check_family_labels` and ``_max_probability``.
    """

    family: typing.ClassVar[str]
    positions: str = "sum"       # per-position outputs: the example's ℓ sums or averages them
    from_logits = False          # a field of the families whose output may be logits
    sparse = False               # a field of Categorical: integer ids (True) or one-hot
    # Outputs read as probabilities must lie in [0, _max_probability]; None: any output.
    _max_probability: typing.ClassVar[typing.Optional[float]] = None
    _draw: typing.ClassVar = staticmethod(tf.random.stateless_uniform)

    @property
    def key(self):
        """A hashable key for caches of compiled functions."""
        return (self.family, self.from_logits, self.sparse, self.positions)

    # -- what a family supplies ---------------------------------------------------------
    def nll(self, y, out):
        """ℓ(y, o) for each leading index of ``out``; ``out`` is float32 (..., D)."""
        raise NotImplementedError

    def _observed(self, y):
        """True labels as ``nll`` takes them."""
        return tf.cast(y, tf.float32)

    def _sample(self, out, noise):
        """Labels ŷ (K, N, ...) drawn from p(·|o) by ``noise`` (see :meth:`noise`)."""
        raise NotImplementedError

    def _exact(self, out):
        """The exact kind's ``(U, W)`` for ``out`` (N, *output)."""
        raise NotImplementedError

    def _num_exact(self, out_tail):
        """K of the exact kind for an output of shape (batch, *out_tail)."""
        raise NotImplementedError

    def _noise_shape(self, num_samples, out_shape):
        return tf.concat([[num_samples], out_shape], 0)

    def _check_family_labels(self, y, out_dim, out_tail):
        """The family's label checks on finite real NumPy ``y``; returns them cast."""
        raise NotImplementedError

    # -- the kinds, once -----------------------------------------------------------------
    def num_cotangents(self, kind, num_samples, out_tail):
        """K, the number of output cotangents per example (see the module table); for
        per-position outputs the exact kind's K is the family's K per position times the
        positions (binary/MSE: the same count whether the units of a position or every
        output element are the positions)."""
        if kind == "empirical":
            return 1
        if kind == "sampled":
            return num_samples
        positions, units = split_positions(self, out_tail)
        if not positions:
            return self._num_exact(tuple(out_tail))
        return self._num_exact(units) * math.prod(positions)

    def noise(self, seed, num_samples, out_shape):
        """Noise for the sampled kind; ``seed`` is an int32 tensor [seed, batch_index]."""
        return self._draw(self._noise_shape(num_samples, out_shape), seed=seed, alg="philox")

    def cotangents(self, out, y, kind, noise=None, weights=None):
        """Output cotangents ``U`` (K, N, *out) and weights ``W`` (K, N), float32.

        ``weights`` (N, *positions) float32 or None: the weight s_nt of each position's
        log-likelihood (a padding mask, a ``sample_weight``); the example's ℓ_n is
        Σ_t s_nt ℓ_nt (``positions="sum"``) or that over its number of positions with
        s_nt > 0 (``"mean"``), so each position's cotangent is scaled by its weight."""
        # tf.identity drops the `_keras_logits` that Keras attaches to softmax/sigmoid outputs:
        # its losses would otherwise read those logits and bypass the tensor we differentiate.
        out = tf.identity(tf.cast(out, tf.float32))
        n = tf.shape(out)[0]
        weights = self._position_weights(out, weights)
        if kind == "exact":
            if weights is None:
                return self._exact(out)
            return self._exact_per_position(out, weights)
        if kind == "empirical":
            labels, k, w = self._observed(y)[None], 1, tf.ones([1, n], tf.float32)
        else:
            k = noise.shape[0]          # static: K = num_samples
            labels, w = self._sample(out, noise), tf.fill([k, n], 1.0 / tf.cast(k, tf.float32))
        u = self._grad_wrt_out(labels, out[None] if k == 1 else _repeat(out, k))
        return (u if weights is None else u * _expand(weights[None], u.shape.rank)), w

    def _position_weights(self, out, weights):
        """The per-position factors of ℓ_n (N, *positions), None for an output without
        positions and without weights (every classification output, unchanged)."""
        rank = None if weights is None else weights.shape.rank - 1
        positions, _ = split_positions(self, out.shape[1:], rank)
        if weights is None:
            if not positions:
                return None
            weights = tf.ones(tf.shape(out)[:1 + len(positions)], tf.float32)
        weights = tf.cast(weights, tf.float32)
        if self.positions == "mean" and positions:
            axes = list(range(1, 1 + len(positions)))
            count = tf.reduce_sum(tf.cast(weights > 0, tf.float32), axis=axes, keepdims=True)
            weights = tf.math.divide_no_nan(weights, count)
        return weights

    def _exact_per_position(self, out, weights):
        """The exact kind for ℓ_n = Σ_t s_t ℓ_t(y_t): the labels y_t are independent given
        x, so E[g gᵀ] = Σ_t s_t² E[g_t g_tᵀ] (module docstring): the family's exact
        cotangents of each position, scaled by s_t, placed at that position (zero
        elsewhere), K·P of them."""
        tail = out.shape[1:]
        positions, units = split_positions(self, tail, weights.shape.rank - 1)
        n, p, d = tf.shape(out)[0], math.prod(positions), math.prod(units)
        rows = tf.reshape(out, [-1] + (list(units) or [1]))       # (N·P, *units)
        u, w = self._exact(rows)                                  # (K, N·P, *units), (K, N·P)
        k = u.shape[0]
        u = tf.reshape(u, [k, n, p, d]) * tf.reshape(weights, [1, n, p, 1])
        spread = u[:, None] * tf.eye(p, dtype=tf.float32)[None, :, None, :, None]   # (K, P, N, P, D)
        u = tf.reshape(spread, tf.concat([[k * p, n], tail], 0))
        w = tf.reshape(tf.transpose(tf.reshape(w, [k, n, p]), [0, 2, 1]), [k * p, n])
        return u, w

    def _grad_wrt_out(self, labels, out_k):
        """∂ℓ(labels_k, o)/∂o for K label sets at once; ``out_k`` is (K, N, ...)."""
        with tf.GradientTape() as tape:
            tape.watch(out_k)
            total = tf.reduce_sum(self.nll(labels, out_k))
        return tape.gradient(total, out_k)

    # -- checks (host side) --------------------------------------------------------------
    def check_output_range(self, low, high):
        """Probabilities (``from_logits=False``) must lie in [0, 1]; logits passed as
        probabilities would give a meaningless, even negative, "Fisher"."""
        if self._max_probability is None or self.from_logits:
            return
        if low < 0.0 or high > self._max_probability:
            raise ValueError(
                "`loss` has from_logits=False, so the model must output probabilities in [0, 1]. "
                f"Received: model outputs in [{low:.4g}, {high:.4g}]. If the model outputs logits, "
                "pass a loss object with from_logits=True.")

    def check_exact_cost(self, kind, out_tail):
        """Raise before any work if the exact kind needs more than
        ``MAX_EXACT_COTANGENTS`` backward passes per example (an ImageNet head, a
        vocabulary times the positions of a sequence), naming the cost, the kinds that
        cost one pass and the setting that allows it."""
        if kind != "exact":
            return
        k = self.num_cotangents(kind, 1, out_tail)
        if k <= MAX_EXACT_COTANGENTS:
            return
        positions, units = split_positions(self, out_tail)
        per = (f" ({self._num_exact(units)} per position x {math.prod(positions)} positions)"
               if positions else "")
        raise ValueError(
            f"`kind`='exact' needs {k} backward passes per example{per} for a model output of "
            f"shape {_batch_shape(tuple(out_tail))}, more than the limit of {MAX_EXACT_COTANGENTS} "
            "(fastewc.max_exact_cotangents()): nothing was computed. Use kind='sampled' (one backward "
            "pass per draw, num_samples draws; an unbiased estimate of the same Fisher) or "
            "kind='empirical' (one pass, the true labels), or, to pay about "
            f"{k}x the empirical kind's cost, first call fastewc.set_max_exact_cotangents({k}). "
            "Received: kind='exact'")

    def check_labels(self, y, out_dim, out_tail=None):
        """Raise a clear error if labels ``y`` (NumPy) do not fit this loss; return them
        as the compiled functions take them.

        Labels must be real numbers (TypeError otherwise) and finite; then the family's
        checks apply (shape, class ids, range).
        """
        y = np.asarray(y)
        if y.dtype.kind not in "biuf":
            raise TypeError("`data` labels (y) must be real numbers (integer, floating point or "
                            f"bool). Received: labels of dtype {y.dtype}")
        if y.dtype.kind == "f" and not np.all(np.isfinite(y)):
            raise ValueError("`data` labels (y) must be finite. Received: labels with "
                             f"{int(np.sum(~np.isfinite(y)))} NaN or Inf values")
        return self._check_family_labels(y, out_dim, out_tail)


    def weight_rank(self, weight_tail, out_tail, *, what):
        """The rank (without the batch axis) position weights of per-example shape
        ``weight_tail`` take for an output of shape (batch, *out_tail), after
        :func:`broadcast_weights`: (batch, *positions), or for binary/MSE also the output's
        own shape.  Raises a ValueError naming ``what`` (e.g. "`data` sample_weight") for
        any other shape."""
        weight_tail, tail = tuple(int(d) for d in weight_tail), tuple(int(d) for d in out_tail)
        positions = tail[:-1]
        if weight_tail in ((), positions) or (weight_tail == positions + (1,) and tail[-1:] == (1,)):
            return len(positions)
        if self.family != "categorical" and weight_tail == tail and tail:
            return len(tail)
        allowed = [_batch_shape(()), _batch_shape(positions)] + (
            [_batch_shape(tail)] if self.family != "categorical" and tail else [])
        raise ValueError(
            f"{what[0].upper() + what[1:]} must weigh each example or each output position: shape "
            f"{' or '.join(dict.fromkeys(allowed))} for a model output of shape {_batch_shape(tail)}"
            f"{' (positions, classes)' if self.family == 'categorical' and positions else ''}. "
            f"Received: {what} of shape {_batch_shape(weight_tail)}")


def broadcast_weights(weights, rank):
    """Per-position weights (N, ...) broadcast (a per-example weight) or squeezed (a
    trailing 1) to rank ``rank`` + 1, the rank :meth:`Likelihood.weight_rank` gave."""
    weights = tf.cast(weights, tf.float32)
    if weights.shape.rank == rank + 2:
        weights = weights[..., 0]
    while weights.shape.rank < rank + 1:
        weights = weights[..., None]
    return weights


def check_sample_weight(likelihood, w, out_tail):
    """``sample_weight`` given with ``data`` (NumPy): real, finite, non-negative and of a
    shape :meth:`Likelihood.weight_rank` takes; returned float32 of shape (N, *positions)
    (a per-example weight broadcast over the positions)."""
    w = np.asarray(w)
    if w.dtype.kind not in "biuf":
        raise TypeError("`data` sample_weight must be real numbers. "
                        f"Received: sample_weight of dtype {w.dtype}")
    if w.ndim == 0:
        raise ValueError("`data` sample_weight must have a leading batch dimension. "
                         f"Received: sample_weight of shape {w.shape}")
    if not np.all(np.isfinite(w)) or (w.size and w.min() < 0):
        raise ValueError("`data` sample_weight must be finite and >= 0. Received: sample_weight in "
                         f"[{np.nanmin(w) if w.size else 0}, {np.nanmax(w) if w.size else 0}]"
                         + (" with NaN or Inf" if not np.all(np.isfinite(w)) else ""))
    rank = likelihood.weight_rank(w.shape[1:], out_tail, what="`data` sample_weight")
    w = w.astype(np.float32)
    if w.ndim == rank + 2:
        w = w[..., 0]
    target = w.shape[:1] + tuple(int(d) for d in out_tail)[:rank]
    return np.ascontiguousarray(np.broadcast_to(w.reshape(w.shape + (1,) * (rank + 1 - w.ndim)), target))


@dataclasses.dataclass(frozen=True)
class Categorical(Likelihood):
    """Softmax classification: sparse (integer ids) or one-hot categorical cross-entropy."""

    family: typing.ClassVar[str] = "categorical"
    from_logits: bool = False
    sparse: bool = True
    _max_probability: typing.ClassVar[float] = math.inf    # unnormalised: divided by the sum

    def nll(self, y, out):
        if self.sparse:
            return keras.ops.sparse_categorical_crossentropy(y, out, from_logits=self.from_logits)
        return keras.ops.categorical_crossentropy(y, out, from_logits=self.from_logits)

    def probs(self, out):
        """Predictive class probabilities p(·|x)."""
        if self.from_logits:
            return tf.nn.softmax(out, axis=-1)
        return out / tf.reduce_sum(out, axis=-1, keepdims=True)

    def _observed(self, y):
        return y if self.sparse else tf.cast(y, tf.float32)

    def _as_labels(self, class_ids, num_classes):
        if self.sparse:
            return class_ids
        return tf.one_hot(class_ids, num_classes, dtype=tf.float32)

    def _reduces(self, classes):
        """Whether the exact kind drops the score's zero-mean direction (logits only)."""
        return self.from_logits and classes >= 2

    def _noise_shape(self, num_samples, out_shape):
        return tf.concat([[num_samples], out_shape[:-1]], 0)

    def _sample(self, out, noise):
        """The inverse CDF of p at uniform ``noise`` (K, N, *positions): one label per
        position, each drawn from that position's predictive (teacher-forced)."""
        p = self.probs(out)
        cdf = tf.cumsum(p, axis=-1)
        ids = tf.reduce_sum(tf.cast(cdf[None] < noise[..., None], tf.int32), axis=-1)
        ids = tf.minimum(ids, tf.shape(p)[-1] - 1)
        return self._as_labels(ids, tf.shape(p)[-1])

    def _num_exact(self, out_tail):
        classes = out_tail[-1]
        return classes - 1 if self._reduces(classes) else classes

    def _exact(self, out):
        c = out.shape[-1]
        ids = tf.broadcast_to(tf.range(c)[:, None], [c, tf.shape(out)[0]])
        u = self._grad_wrt_out(self._as_labels(ids, c), _repeat(out, c))
        w = tf.transpose(self.probs(out))
        return drop_score_direction(u, w) if self._reduces(c) else (u, w)

    def _check_family_labels(self, y, out_dim, out_tail):
        positions = tuple(int(d) for d in out_tail[:-1]) if out_tail is not None else ()
        output = f" for a model output of shape {_batch_shape(tuple(out_tail))}" if positions else ""
        if not self.sparse:
            want = positions + (out_dim,)
            if y.shape[1:] != want:
                raise ValueError(
                    f"Categorical labels must be one-hot rows of shape {_batch_shape(want)}{output}. "
                    f"Received: labels of shape {y.shape if not positions else _batch_shape(y.shape[1:])}; "
                    "for integer ids use loss='sparse_categorical_crossentropy'.")
            return y.astype(np.float32, copy=False)
        if y.ndim == len(positions) + 2 and y.shape[-1] == 1:
            y = y[..., 0]
        if y.shape[1:] != positions:
            if not positions:
                raise ValueError(
                    "Sparse categorical labels must be integer class ids of shape (batch,). "
                    f"Received: labels of shape {y.shape}; for one-hot labels use "
                    "loss='categorical_crossentropy'.")
            raise ValueError(
                "`data` labels (y) must be integer class ids of shape "
                f"{_batch_shape(positions)}, one per position{output}. Received: labels of shape "
                f"{_batch_shape(y.shape[1:])}" + ("; for one-hot labels use loss='categorical_crossentropy'."
                                                   if y.shape[1:] == positions + (out_dim,) else "."))
        if not np.issubdtype(y.dtype, np.integer) and not np.all(np.equal(np.mod(y, 1), 0)):
            raise ValueError(
                f"Sparse categorical labels must be integers. Received: dtype {y.dtype} "
                "with non-integer values.")
        if y.size and (y.min() < 0 or y.max() >= out_dim):
            raise ValueError(
                f"Labels must be class ids in [0, {out_dim}) for a model with {out_dim} "
                f"outputs. Received: labels in [{y.min()}, {y.max()}]."
                + (" Padded positions need valid ids too (e.g. 0; their weight is 0)." if positions else ""))
        return y.astype(np.int32, copy=False)


@dataclasses.dataclass(frozen=True)
class Bernoulli(Likelihood):
    """D independent binary outputs: binary cross-entropy summed over the units."""

    family: typing.ClassVar[str] = "binary"
    from_logits: bool = False
    _max_probability: typing.ClassVar[float] = 1.0

    def nll(self, y, out):
        return tf.reduce_sum(keras.ops.binary_crossentropy(y, out, from_logits=self.from_logits), axis=-1)

    def probs(self, out):
        """Each unit's probability of outcome 1."""
        return tf.sigmoid(out) if self.from_logits else out

    def _sample(self, out, noise):
        """Outcome 1 where uniform ``noise`` (K, N, D) < p."""
        return tf.cast(noise < self.probs(out)[None], tf.float32)

    def _num_exact(self, out_tail):
        units = math.prod(out_tail)
        return units if self.from_logits else 2 * units

    def _exact(self, out):
        p = self.probs(out)                                   # (N, D)
        units = tf.eye(out.shape[-1], dtype=tf.float32)       # (D, D)
        us, ws = [], []
        for outcome in (0.0, 1.0):
            target = tf.fill(tf.shape(out), outcome)
            with tf.GradientTape() as tape:
                tape.watch(out)
                total = tf.reduce_sum(keras.ops.binary_crossentropy(target, out, from_logits=self.from_logits))
            g = tape.gradient(total, out)                     # (N, D): ∂ℓ_j(b)/∂o_j
            us.append(units[:, None, :] * g[None])            # (D, N, D)
            ws.append(tf.transpose(p if outcome else 1.0 - p))
        if self.from_logits:                                  # per unit: 2 outcomes -> 1
            u, w = drop_score_direction(tf.stack(us), tf.stack(ws))
            return u[0], w[0]
        return tf.concat(us, 0), tf.concat(ws, 0)

    def _check_family_labels(self, y, out_dim, out_tail):
        y = _output_shaped(y, out_tail)
        if y.size and (y.min() < 0 or y.max() > 1):
            raise ValueError(
                f"Binary cross-entropy labels must lie in [0, 1]. Received: labels in [{y.min()}, {y.max()}].")
        return y.astype(np.float32, copy=False)


@dataclasses.dataclass(frozen=True)
class Gaussian(Likelihood):
    """Unit-variance Gaussian outputs (mean squared error)."""

    family: typing.ClassVar[str] = "gaussian"
    _draw: typing.ClassVar = staticmethod(tf.random.stateless_normal)

    def nll(self, y, out):
        diff = tf.cast(y, out.dtype) - out
        flat = tf.reshape(diff * diff, tf.concat([tf.shape(diff)[:-1], [-1]], 0))
        return 0.5 * tf.reduce_sum(flat, axis=-1)

    def _sample(self, out, noise):
        """ŷ = o + ε for standard normal ``noise`` ε (K, N, *output)."""
        return out[None] + noise

    def _num_exact(self, out_tail):
        return math.prod(out_tail)

    def _exact(self, out):
        d = math.prod(out.shape[1:])          # static even when the batch dimension is not
        n = tf.shape(out)[0]
        u = tf.broadcast_to(tf.eye(d, dtype=tf.float32)[:, None, :], [d, n, d])
        return tf.reshape(u, tf.concat([[d], tf.shape(out)], 0)), tf.ones([d, n], tf.float32)

    def _check_family_labels(self, y, out_dim, out_tail):
        return _output_shaped(y, out_tail).astype(np.float32, copy=False)


def drop_score_direction(u, w):
    """C outcome cotangents with probabilities as weights -> C − 1 with unit weights.

    ``u`` (C, ...) holds the score u_c = ∂ℓ(c)/∂o of every outcome and ``w`` (C, ...) its
    probability p_c (leading axes beyond the first are batch axes and broadcast).  The
    exact Fisher in output space is M = Σ_c p_c u_c u_cᵀ = B Bᵀ with columns b_c = √p_c u_c.
    The score has mean zero, Σ_c p_c u_c = 0, i.e. B s = 0 for the unit vector s = √p, so

        M = B (I − s sᵀ) Bᵀ = (B H E)(B H E)ᵀ

    with H = I − v vᵀ/(1 + s_m), v = s + e_m, the Householder reflection taking s to −e_m
    (so I − s sᵀ = H (I − e_m e_mᵀ) H), and E the identity without column m.  Column j of
    B H E is c_j = b_j − b_m · s_j / (1 + s_m): C − 1 cotangents of weight 1 give the same
    Fisher as the C weighted ones, for any per-example p (1 + s_m ≥ 1 never divides by a
    small number).  m is the last outcome.  One backward pass in C fewer per example (one
    in two for a sigmoid unit)."""
    s = tf.sqrt(tf.maximum(w, 0.0))
    grow = [Ellipsis] + [None] * (u.shape.rank - w.shape.rank)
    b = u * s[tuple(grow)]
    coefficient = s[:-1] / (1.0 + s[-1:])
    return b[:-1] - b[-1:] * coefficient[tuple(grow)], tf.ones_like(w[:-1])


def probability_activation(out):
    """``"softmax"`` or ``"sigmoid"`` if ``out`` was produced by that Keras activation (it
    then carries ``_keras_logits``, the logits before it, which Keras' cross-entropies read
    and warn about when told ``from_logits=True``), else None.  ``out`` is an eager tensor
    or a traced one; a cast (mixed precision) or ``tf.identity`` loses the mark."""
    logits = getattr(out, "_keras_logits", None)
    if logits is None:
        op = getattr(out, "op", None) if not tf.executing_eagerly() else None
        kind = getattr(op, "type", None)
        return {"Softmax": "softmax", "Sigmoid": "sigmoid"}.get(kind)
    if not tf.executing_eagerly():
        return "sigmoid" if getattr(getattr(out, "op", None), "type", None) == "Sigmoid" else "softmax"
    out, logits = tf.cast(out, tf.float32), tf.cast(logits, tf.float32)
    close = bool(tf.reduce_all(tf.abs(out - tf.sigmoid(logits)) <= 1e-3))
    return "sigmoid" if close else "softmax"


def describe_output(model):
    """"the output of model 'm' (layer 'probs')": the layer that produces a functional or
    Sequential model's single output (a nested model's, recursively), else the model."""
    where, layer = f"the output of model '{model.name}'", model
    for _ in range(8):                         # nested models, a few levels deep
        outputs = getattr(layer, "outputs", None)
        if not isinstance(layer, keras.Model) or not outputs or len(outputs) != 1:
            break
        producer = None
        for candidate in reversed(layer.layers):
            try:
                if candidate.output is outputs[0]:
                    producer = candidate
                    break
            except (AttributeError, ValueError, RuntimeError):   # never called, or called twice
                continue
        if producer is None:
            break
        layer = producer
    if layer is not model:
        where += f" (layer '{layer.name}', {type(layer).__name__})"
    return where


def split_positions(likelihood, out_tail, weight_rank=None):
    """(positions, units) of an output of shape (batch, *out_tail): the axes the example's
    log-likelihood sums over as independent positions, and those of one position's
    outcome.  Categorical: the classes are the last axis, the rest are positions.  Binary
    and Gaussian: likewise (units last), unless position weights of ``weight_rank`` (their
    rank without the batch axis) cover every axis: then each output element is a position.
    """
    tail = tuple(int(d) for d in out_tail)
    if not tail:
        return (), ()
    if likelihood.family != "categorical" and weight_rank == len(tail):
        return tail, ()
    return tail[:-1], tail[-1:]


def _expand(t, rank):
    """``t`` with trailing axes of size 1 up to ``rank``."""
    return tf.reshape(t, tf.concat([tf.shape(t), [1] * (rank - t.shape.rank)], 0))


def _repeat(out, k):
    """``out`` (N, ...) broadcast to (k, N, ...)."""
    return tf.broadcast_to(out[None], tf.concat([[k], tf.shape(out)], 0))


def _output_shaped(y, out_tail):
    """Labels with the output's shape (batch, *out_tail); labels of shape (batch,) for an
    output of shape (batch, 1) get the trailing 1, as Keras losses do."""
    if out_tail is None:
        return y
    want = tuple(int(d) for d in out_tail)
    if y.shape[1:] != want and y.shape[1:] + (1,) == want:
        y = y[..., None]
    if y.shape[1:] != want:
        raise ValueError(
            f"`data` labels (y) for this loss must have the model output's shape "
            f"{_batch_shape(want)}. Received: labels of shape {_batch_shape(y.shape[1:])}")
    return y


def _batch_shape(tail):
    """'(batch, 3)' / '(batch,)': a shape with its batch dimension named."""
    return "(batch," + "".join(f" {d}," for d in tail)[:-1] + ")" if tail else "(batch,)"


# -- Keras losses -> likelihoods ----------------------------------------------------------
_BY_NAME = {
    "sparse_categorical_crossentropy": Categorical(sparse=True),
    "categorical_crossentropy": Categorical(sparse=False),
    "binary_crossentropy": Bernoulli(),
    "mse": Gaussian(),
    "mean_squared_error": Gaussian(),
}

# Loss classes, most specific first, with the option that would make them not a
# log-likelihood and that option's neutral value.
_BY_CLASS = (
    (keras.losses.SparseCategoricalCrossentropy, "ignore_class", None,
     lambda logits: Categorical(from_logits=logits, sparse=True)),
    (keras.losses.CategoricalCrossentropy, "label_smoothing", 0.0,
     lambda logits: Categorical(from_logits=logits, sparse=False)),
    (keras.losses.BinaryCrossentropy, "label_smoothing", 0.0,
     lambda logits: Bernoulli(from_logits=logits)),
    (keras.losses.MeanSquaredError, None, None, lambda logits: Gaussian()),
)


def resolve_loss(loss):
    """Map a Keras loss name, class instance or function to its :class:`Likelihood`."""
    if isinstance(loss, str) and loss.lower() in _BY_NAME:
        return _BY_NAME[loss.lower()]
    if isinstance(loss, keras.losses.Loss):
        config = loss.get_config()
        for cls, option, neutral, make in _BY_CLASS:
            if isinstance(loss, cls):
                if option is not None:
                    _reject_option(loss, config, option, neutral)
                return make(bool(config.get("from_logits", False)))
    elif callable(loss):
        for name in ("sparse_categorical_crossentropy", "categorical_crossentropy",
                     "binary_crossentropy", "mean_squared_error"):
            if loss is getattr(keras.losses, name, None):
                return _BY_NAME[name]
    raise ValueError(
        "`loss` must be one of 'sparse_categorical_crossentropy', 'categorical_crossentropy', "
        "'binary_crossentropy', 'mse' (a name, a keras.losses class instance or function): "
        f"the Fisher needs the loss's likelihood. Received: loss={loss!r}")


def _reject_option(loss, config, option, neutral):
    if config.get(option, neutral) != neutral:
        raise ValueError(
            f"`loss` {type(loss).__name__} with {option}={config[option]!r} is not a "
            "log-likelihood, so it has no Fisher. Use the loss without it. "
            f"Received: loss={loss!r}")
