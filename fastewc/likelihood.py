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
| exact       | C−1 / D / D (logits) | see below                     | 1              |

Families (ℓ always as the log-likelihood of the model, which is what the Fisher needs):

* categorical (sparse or one-hot cross-entropy): ℓ is Keras' cross-entropy itself,
  ``from_logits`` honoured.  Exact: the C outcomes u_n(c) weighted by p_c, reduced to
  K = C − 1 unit-weight cotangents for logits (:func:`drop_score_direction`).
* binary (binary cross-entropy, D independent Bernoulli outputs): ℓ = Σ_j BCE_j, the SUM
  over output units (Keras averages them; the likelihood of D independent units sums).
  Exact: for each unit j and outcome b ∈ {0, 1}, weighted by p_j(b), reduced to one
  cotangent per unit (K = D) for logits.  The cross terms between units vanish in
  expectation, so this is the full expectation.

Probabilities (``from_logits=False``) keep all C / 2D outcomes: Keras clips them to
[ε, 1 − ε], and the clipped score no longer has mean zero, which the reduction needs.
* gaussian (``"mse"``): a unit-variance Gaussian, ℓ = ½‖y − o‖² (Keras' MSE is the mean of
  the squares; the log-likelihood is half their sum).  Exact: K = D unit cotangents e_j,
  which gives diag(JᵀJ).  Sampled: ŷ = o + ε, ε ~ N(0, I).

Sampling is reproducible: the noise of batch b is drawn with
``tf.random.stateless_uniform`` / ``stateless_normal`` (alg="philox", identical with and without XLA) at seed ``[seed, b]`` and shape
(num_samples, batch, ...); categorical labels come from the inverse CDF of p, Bernoulli
outcomes from ``u < p``.
"""
import dataclasses

import keras
import numpy as np
import tensorflow as tf

KINDS = ("empirical", "sampled", "exact")

_CATEGORICAL_NAMES = {
    "sparse_categorical_crossentropy": True,
    "categorical_crossentropy": False,
}


@dataclasses.dataclass(frozen=True)
class Likelihood:
    """The probabilistic model behind a Keras loss.

    ``family`` is "categorical", "binary" or "gaussian"; ``sparse`` says whether
    categorical labels are integer ids (True) or one-hot rows (False).
    """

    family: str
    from_logits: bool = False
    sparse: bool = True

    @property
    def key(self):
        return (self.family, self.from_logits, self.sparse)

    # -- per-example negative log-likelihood -------------------------------------------
    def nll(self, y, out):
        """ℓ(y, o) for each leading index of ``out``; ``out`` is float32 (..., D)."""
        if self.family == "categorical":
            if self.sparse:
                return keras.ops.sparse_categorical_crossentropy(
                    y, out, from_logits=self.from_logits)
            return keras.ops.categorical_crossentropy(y, out, from_logits=self.from_logits)
        if self.family == "binary":
            per_unit = keras.ops.binary_crossentropy(y, out, from_logits=self.from_logits)
            return tf.reduce_sum(per_unit, axis=-1)
        diff = tf.cast(y, out.dtype) - out
        return 0.5 * tf.reduce_sum(tf.reshape(diff * diff, tf.concat([tf.shape(diff)[:-1], [-1]], 0)), axis=-1)

    def probs(self, out):
        """Predictive probabilities p(·|x) from the output (categorical / binary)."""
        if self.family == "categorical":
            if self.from_logits:
                return tf.nn.softmax(out, axis=-1)
            return out / tf.reduce_sum(out, axis=-1, keepdims=True)
        if self.from_logits:
            return tf.sigmoid(out)
        return out

    def _grad_wrt_out(self, labels, out_k):
        """∂ℓ(labels_k, o)/∂o for K label sets at once; ``out_k`` is (K, N, D)."""
        with tf.GradientTape() as tape:
            tape.watch(out_k)
            total = tf.reduce_sum(self.nll(labels, out_k))
        return tape.gradient(total, out_k)

    def _as_labels(self, class_ids, num_classes):
        if self.sparse:
            return class_ids
        return tf.one_hot(class_ids, num_classes, dtype=tf.float32)

    # -- cotangents --------------------------------------------------------------------
    def num_cotangents(self, kind, num_samples, out_tail):
        """K, the number of output cotangents per example (see the module table)."""
        if kind == "empirical":
            return 1
        if kind == "sampled":
            return num_samples
        size = int(np.prod(out_tail))
        if self.family == "categorical":
            return out_tail[-1] - 1 if self._reduces(out_tail[-1]) else out_tail[-1]
        if self.family == "binary":
            return size if self._reduces(2) else 2 * size
        return size

    def _reduces(self, outcomes):
        """Whether the exact kind drops the score's zero-mean direction (logits only)."""
        return self.from_logits and outcomes >= 2

    def noise(self, seed, num_samples, out_shape):
        """Noise for the sampled kind; ``seed`` is an int32 tensor [seed, batch_index]."""
        n = out_shape[0]
        if self.family == "categorical":
            return tf.random.stateless_uniform([num_samples, n], seed=seed, alg="philox")
        if self.family == "binary":
            return tf.random.stateless_uniform(tf.concat([[num_samples], out_shape], 0), seed=seed, alg="philox")
        return tf.random.stateless_normal(tf.concat([[num_samples], out_shape], 0), seed=seed, alg="philox")

    def cotangents(self, out, y, kind, noise=None):
        """Output cotangents ``U`` (K, N, *out) and weights ``W`` (K, N), float32."""
        # tf.identity drops the `_keras_logits` that Keras attaches to softmax/sigmoid outputs:
        # its losses would otherwise read those logits and bypass the tensor we differentiate.
        out = tf.identity(tf.cast(out, tf.float32))
        n = tf.shape(out)[0]
        if kind == "empirical":
            y = y if (self.family == "categorical" and self.sparse) else tf.cast(y, tf.float32)
            u = self._grad_wrt_out(y[None], out[None])
            return u, tf.ones([1, n], tf.float32)
        if kind == "sampled":
            k = noise.shape[0]          # static: K = num_samples
            out_k = tf.broadcast_to(out[None], tf.concat([[k], tf.shape(out)], 0))
            if self.family == "categorical":
                p = self.probs(out)
                cdf = tf.cumsum(p, axis=-1)
                ids = tf.reduce_sum(tf.cast(cdf[None] < noise[..., None], tf.int32), axis=-1)
                ids = tf.minimum(ids, tf.shape(p)[-1] - 1)
                labels = self._as_labels(ids, tf.shape(p)[-1])
            elif self.family == "binary":
                labels = tf.cast(noise < self.probs(out)[None], tf.float32)
            else:
                labels = out_k + noise
            u = self._grad_wrt_out(labels, out_k)
            return u, tf.fill([k, n], 1.0 / tf.cast(k, tf.float32))
        # exact
        if self.family == "categorical":
            p = self.probs(out)
            c = out.shape[-1]
            ids = tf.broadcast_to(tf.range(c)[:, None], [c, n])
            out_k = tf.broadcast_to(out[None], tf.concat([[c], tf.shape(out)], 0))
            u = self._grad_wrt_out(self._as_labels(ids, c), out_k)
            if self._reduces(c):
                return drop_score_direction(u, tf.transpose(p))
            return u, tf.transpose(p)
        if self.family == "binary":
            p = self.probs(out)                                   # (N, D)
            d = out.shape[-1]
            units = tf.eye(d, dtype=tf.float32)                   # (D, D)
            us, ws = [], []
            for outcome in (0.0, 1.0):
                target = tf.fill(tf.shape(out), outcome)
                with tf.GradientTape() as tape:
                    tape.watch(out)
                    per_unit = keras.ops.binary_crossentropy(target, out, from_logits=self.from_logits)
                    total = tf.reduce_sum(per_unit)
                g = tape.gradient(total, out)                     # (N, D): ∂ℓ_j(b)/∂o_j
                us.append(units[:, None, :] * g[None])            # (D, N, D)
                ws.append(tf.transpose(p if outcome else 1.0 - p))
            if self._reduces(2):                                  # per unit: 2 outcomes -> 1
                u, w = drop_score_direction(tf.stack(us), tf.stack(ws))
                return u[0], w[0]
            return tf.concat(us, 0), tf.concat(ws, 0)
        d = int(np.prod(out.shape[1:]))   # static even when the batch dimension is not
        u = tf.broadcast_to(tf.eye(d, dtype=tf.float32)[:, None, :], [d, n, d])
        u = tf.reshape(u, tf.concat([[d], tf.shape(out)], 0))
        return u, tf.ones([d, n], tf.float32)

    def check_output_range(self, low, high):
        """Probabilities (``from_logits=False``) must lie in [0, 1]; logits passed as
        probabilities would give a meaningless, even negative, "Fisher"."""
        if self.family == "gaussian" or self.from_logits:
            return
        if low < 0.0 or (self.family == "binary" and high > 1.0):
            raise ValueError(
                "`loss` has from_logits=False, so the model must output probabilities in [0, 1]. "
                f"Received: model outputs in [{low:.4g}, {high:.4g}]. If the model outputs logits, "
                "pass a loss object with from_logits=True.")

    # -- label checks (host side, before any compute) ----------------------------------
    def check_labels(self, y, out_dim, out_tail=None):
        """Raise a clear ValueError if labels ``y`` (NumPy) do not fit this loss.

        Labels must be real numbers (TypeError otherwise) and finite.  Binary and Gaussian
        labels must have the output's shape ``(batch, *out_tail)``; labels of shape
        (batch,) for an output of shape (batch, 1) get the trailing 1, as Keras losses do.
        """
        y = np.asarray(y)
        if y.dtype.kind not in "biuf":
            raise TypeError("`data` labels (y) must be real numbers (integer, floating point or "
                            f"bool). Received: labels of dtype {y.dtype}")
        if y.dtype.kind == "f" and not np.all(np.isfinite(y)):
            raise ValueError("`data` labels (y) must be finite. Received: labels with "
                             f"{int(np.sum(~np.isfinite(y)))} NaN or Inf values")
        if self.family == "categorical" and out_tail is not None and len(out_tail) != 1:
            raise ValueError(
                "`loss` is a categorical cross-entropy, which needs a `model` output of shape "
                f"(batch, classes). Received: model output of shape {_batch_shape(tuple(out_tail))}; "
                "per-position classes (sequences, images) are not supported: reshape the output.")
        if self.family != "categorical" and out_tail is not None:
            want = tuple(int(d) for d in out_tail)
            if y.shape[1:] != want and y.shape[1:] + (1,) == want:
                y = y[..., None]
            if y.shape[1:] != want:
                raise ValueError(
                    f"`data` labels (y) for this loss must have the model output's shape "
                    f"{_batch_shape(want)}. Received: labels of shape {_batch_shape(y.shape[1:])}")
        if self.family == "categorical" and self.sparse:
            if y.ndim == 2 and y.shape[-1] == 1:
                y = y[:, 0]
            if y.ndim != 1:
                raise ValueError(
                    "Sparse categorical labels must be integer class ids of shape (batch,). "
                    f"Received: labels of shape {y.shape}; for one-hot labels use "
                    "loss='categorical_crossentropy'.")
            if not np.issubdtype(y.dtype, np.integer):
                if not np.all(np.equal(np.mod(y, 1), 0)):
                    raise ValueError(
                        f"Sparse categorical labels must be integers. Received: dtype {y.dtype} "
                        "with non-integer values.")
            if y.size and (y.min() < 0 or y.max() >= out_dim):
                raise ValueError(
                    f"Labels must be class ids in [0, {out_dim}) for a model with {out_dim} "
                    f"outputs. Received: labels in [{y.min()}, {y.max()}].")
            return y.astype(np.int32)
        if self.family == "categorical":
            if y.ndim != 2 or y.shape[-1] != out_dim:
                raise ValueError(
                    f"Categorical labels must be one-hot rows of shape (batch, {out_dim}). "
                    f"Received: labels of shape {y.shape}; for integer ids use "
                    "loss='sparse_categorical_crossentropy'.")
            return y.astype(np.float32)
        if self.family == "binary" and y.size and (y.min() < 0 or y.max() > 1):
            raise ValueError(
                f"Binary cross-entropy labels must lie in [0, 1]. Received: labels in [{y.min()}, {y.max()}].")
        return y.astype(np.float32)


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
    small number).  m is the last outcome.  Saves 1/C of the backward passes (10% on a
    10-class model, half for a sigmoid output)."""
    s = tf.sqrt(tf.maximum(w, 0.0))
    grow = [Ellipsis] + [None] * (u.shape.rank - w.shape.rank)
    b = u * s[tuple(grow)]
    coefficient = s[:-1] / (1.0 + s[-1:])
    return b[:-1] - b[-1:] * coefficient[tuple(grow)], tf.ones_like(w[:-1])


def _batch_shape(tail):
    """'(batch, 3)' / '(batch,)': a shape with its batch dimension named."""
    return "(batch," + "".join(f" {d}," for d in tail)[:-1] + ")" if tail else "(batch,)"


def resolve_loss(loss):
    """Map a Keras loss name, class instance or function to its :class:`Likelihood`."""
    if isinstance(loss, str):
        name = loss.lower()
        aliases = {"mean_squared_error": "mse", "mse": "mse", "binary_crossentropy": "binary_crossentropy"}
        name = aliases.get(name, name)
        if name in _CATEGORICAL_NAMES:
            return Likelihood("categorical", from_logits=False, sparse=_CATEGORICAL_NAMES[name])
        if name == "binary_crossentropy":
            return Likelihood("binary", from_logits=False)
        if name == "mse":
            return Likelihood("gaussian")
    elif isinstance(loss, keras.losses.Loss):
        config = loss.get_config()
        from_logits = bool(config.get("from_logits", False))
        if isinstance(loss, keras.losses.SparseCategoricalCrossentropy):
            _reject_option(loss, config, "ignore_class", None)
            return Likelihood("categorical", from_logits=from_logits, sparse=True)
        if isinstance(loss, keras.losses.CategoricalCrossentropy):
            _reject_option(loss, config, "label_smoothing", 0.0)
            return Likelihood("categorical", from_logits=from_logits, sparse=False)
        if isinstance(loss, keras.losses.BinaryCrossentropy):
            _reject_option(loss, config, "label_smoothing", 0.0)
            return Likelihood("binary", from_logits=from_logits)
        if isinstance(loss, keras.losses.MeanSquaredError):
            return Likelihood("gaussian")
    elif callable(loss):
        fn = getattr(keras.losses, "get", None)
        for name in ("sparse_categorical_crossentropy", "categorical_crossentropy",
                     "binary_crossentropy", "mean_squared_error"):
            if loss is getattr(keras.losses, name, None):
                return resolve_loss(name)
        del fn
    raise ValueError(
        "`loss` must be one of 'sparse_categorical_crossentropy', 'categorical_crossentropy', "
        "'binary_crossentropy', 'mse' (a name, a keras.losses class instance or function): "
        f"the Fisher needs the loss's likelihood. Received: loss={loss!r}")


def _reject_option(loss, config, option, neutral):
    if config.get(option, neutral) not in (neutral,):
        raise ValueError(
            f"`loss` {type(loss).__name__} with {option}={config[option]!r} is not a "
            "log-likelihood, so it has no Fisher. Use the loss without it. "
            f"Received: loss={loss!r}")
