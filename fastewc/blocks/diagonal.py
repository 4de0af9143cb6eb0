"""The diagonal kind: one block per variable, one Fisher value F_i per parameter.

State of a block: (A, μ), float32 of the variable's shape, and the EWC's separate-mode
constant c (shared by all blocks, a scalar of :class:`fastewc.blocks.store.State`):

    P(θ) = λ/2 Σ_i A_i (θ_i − μ_i)² + λ/2 · c,        ∇P = λ·A·(θ − μ)

* ``mode="separate"`` (Kirkpatrick et al. 2017): A = Σ_t F_t, μ = Σ_t F_t θ_t / A and
  c = Σ_t Σ_i F_t,i θ_t,i² − A_i μ_i², so P EQUALS the per-task sum
  Σ_t λ/2 Σ_i F_t,i (θ_i − θ_t,i)² (:func:`fastewc.penalty.merge_separate`);
* ``mode="online"`` (Schwarz et al. 2018): A ← γ·A + F_new, μ ← θ_new, c = 0.

2 float32 per parameter for any number of tasks.  The maths (merges in float64, the
overflow-free value and gradient) is :mod:`fastewc.penalty`'s; this kind applies it to the
blocks of an EWC.  Every tracked variable has a diagonal block, also under another kind
(its A stays 0 where that kind's block covers it), so ``EWC.state()`` lists them all.

Estimation: every variable no other block of the plan covers is a diagonal block,
whatever the curvature chosen, with F_i = (1/N) Σ_n E_{y ~ q_n} [(∂ℓ(y, x_n; θ)/∂θ_i)²]
(:mod:`fastewc.fisher`).  Its per-batch sum is Σ_n Σ_k W_kn g_kn² (shaped like the
variable), from a rule's weighted square sums
(:meth:`fastewc.registry.RuleOutput.square_sums`) or from the per-example gradients of the
vmap, jacobian and loop engines; its mean is F itself.  The sums are one float per
parameter, so each batch's compiled function also forms the mean (the passes fuse there)
and XLA is the CPU default (:mod:`fastewc._policy`).
"""
import numpy as np
import tensorflow as tf

from fastewc import penalty as penalty_lib
from fastewc._checks import as_float32
from fastewc.blocks.base import Block
from fastewc.blocks.task import shape_of
from fastewc.curvature import KroneckerFisher

_FLOAT32_MAX = float(np.finfo(np.float32).max)
_FIELDS = ("fisher", "anchor")




def _path(variable):
    return getattr(variable, "path", None) or variable.name


class Diagonal(Block):
    """A variable's diagonal Fisher block: on the estimation side an instance covering one
    variable; on the EWC side keyed by the variable's EWC key (its path)."""

    kind = "diagonal"
    scales_sums = True
    sums_over_cotangents = (True,)     # Σ_k Σ_n w_kn g_kn²

    def __init__(self, variable):
        self.variables = (variable,)
        self.sum_shapes = (tuple(variable.shape),)
        self.sum_names = (_path(variable),)

    # -- estimation ------------------------------------------------------------------------
    @classmethod
    def rule_sums(cls, result, delta, weight, mask, scale=None):
        """Σ_k Σ_n w_kn g_kn² (times ``scale``, folded into the weights: the sums are linear in them)."""
        weight = weight if scale is None else weight * scale
        return {(cls.kind, id(variable)): (value,) for variable, value in result.square_sums(delta, weight)}

    def gradient_sums(self, squares):
        return (squares[id(self.variables[0])],)

    def finish(self, means):
        return means[0]

    @classmethod
    def assemble(cls, blocks, parts, variables):
        """The list of float32 tensors, one per variable, shaped like it."""
        return list(parts)

    # -- state -------------------------------------------------------------------------
    OPTIONS = ()
    MODES = ("separate", "online")          # the EWC modes it takes
    METHOD, TITLE = "ewc", "EWC"            # its demo methods' prefix ("ewc_separate") and title
    TABLES = {"fisher": "_fisher", "anchor": "_anchor"}   # table -> checkpoint path
    FILE_FIELD, FILE_VERSION = "state", 1

    @staticmethod
    def addresses(key, n=2):
        """``[(table, table key, variable name)]`` of A and μ (``ewc/_fisher/<key>``, ...)."""
        return [(field, key, field) for field in _FIELDS[:n]]

    @staticmethod
    def model_variables(key, by_key):
        return (by_key[key],)

    @staticmethod
    def label(key):
        return key

    @staticmethod
    def num_terms(fields):
        return 0

    @staticmethod
    def zeros(variable):
        """The fields of a block not penalized yet: A = 0, μ = 0."""
        return [tf.zeros(shape_of(variable), tf.float32)] * 2

    @staticmethod
    def snapshot(blocks):
        """``{key: (A, μ)}`` as float32 NumPy arrays (``EWC.state()``)."""
        return {key: (fields[0].numpy(), fields[1].numpy()) for key, fields in blocks.items()}

    # The task.
    @staticmethod
    def check_result(result, source, tracking):
        if isinstance(result, KroneckerFisher):
            raise ValueError(
                "`fisher` is a fastewc.KroneckerFisher, but this EWC has curvature='diagonal'. "
                "Build it with fastewc.EWC(model, lam=..., curvature='kfac'), or pass the diagonal "
                "(fastewc.fisher_diagonal). Received: a KroneckerFisher")

    @staticmethod
    def estimate(result, source, tracking):
        """``{key: F}`` (float32) of ``source``'s trainable variables: the list itself, or
        the diagonal rest of a Kronecker result (zeros where its blocks cover a variable)."""
        trainable = list(source.trainable_variables)
        if isinstance(result, KroneckerFisher):
            result = [tf.zeros(v.shape, tf.float32) if f is None else f
                      for v, f in zip(trainable, result.diagonal)]
        values = check_aligned("fisher", result, source)
        return {tracking.key(v): as_float32(f) for v, f in zip(trainable, values)}

    @staticmethod
    def merge(current, task, settings, tracking):
        """The new (A, μ) of every tracked or entering variable and the constant's
        increment (:func:`fastewc.penalty.merge_all`, one variable at a time); nothing is
        assigned.  Tracked variables the task has no Fisher for get F = 0 at their current
        weights.  Raises for a negative or non-finite Fisher, a non-finite anchor and a
        merge whose float32 result (A, μ or c) would not be finite, naming the variable."""
        by_key, estimates = task.by_key, task.estimates[Diagonal.kind]
        fresh = {tracking.key(v): v for v in tracking.new_trainable(current)}
        keys = list(current) + [k for k in fresh if k not in current]
        old, fs, thetas = [], [], []
        for key in keys:
            if key in current:
                old.append(tuple(current[key]))
            else:
                zeros = tf.zeros(shape_of(fresh[key]), tf.float32)
                old.append((zeros, zeros))
            if key in estimates:
                fs.append(estimates[key])
                thetas.append(task.theta[key])
            else:                                # tracked but frozen: no new information
                fs.append(tf.zeros(shape_of(by_key[key]), tf.float32))
                thetas.append(penalty_lib.read_float32(by_key[key]))
        a_new, mu_new, delta_c, bad = penalty_lib.merge_all(
            [o[0] for o in old], [o[1] for o in old], fs, thetas, settings.mode == "online",
            tf.constant(settings.gamma, tf.float64))
        for i, (key, (bad_fisher, bad_theta)) in enumerate(zip(keys, bad.numpy())):
            if bad_theta:
                where = ("`anchors` entry for variable" if task.anchors_given and key in task.theta
                         else "The `model` weights of variable")
                raise ValueError(
                    f"{where} '{by_key[key].path}' must be finite to be a task's anchor. Received: "
                    "NaN or Inf values (did training diverge?)")
            if bad_fisher:
                low, high = float(tf.reduce_min(fs[i])), float(tf.reduce_max(fs[i]))
                if np.isfinite(low) and np.isfinite(high) and low >= 0:
                    a_finite = bool(tf.reduce_all(tf.math.is_finite(a_new[i])))
                    raise _overflow_error(by_key[key].path, high, float(tf.reduce_max(old[i][0])),
                                          a_overflows=not a_finite)
                raise ValueError(
                    f"`fisher`: the Fisher of variable '{by_key[key].path}' must be finite and >= 0. "
                    f"Received: values in [{low}, {high}]. "
                    "(Negative values come from a probability loss with from_logits=False on a "
                    "model whose output is not a softmax/sigmoid: pass from_logits=True for logits.)")
        const = settings.const + float(delta_c)
        if not abs(const) <= _FLOAT32_MAX:                 # the penalty reads c as float32
            shares = [float(penalty_lib.merge_separate(o[0], o[1], f, t)[2])
                      for o, f, t in zip(old, fs, thetas)]
            worst = keys[int(np.argmax(shares))]
            raise ValueError(
                f"`fisher`: adding this task would overflow the float32 EWC state: the constant "
                f"c of the separate-mode penalty would reach {const:.3g}, above float32's largest "
                f"value {_FLOAT32_MAX:.4g} (variable '{by_key[worst].path}' adds the most, "
                f"{max(shares):.3g}). The state is unchanged. Received: a Fisher or anchors too "
                "large for float32 (rescale the loss or the weights, or use mode='online').")
        return {key: [a, mu] for key, a, mu in zip(keys, a_new, mu_new)}, delta_c

    # The penalty: λ/2 Σ A (θ − μ)², gradient λ·A·(θ − μ) (:func:`fastewc.penalty.quadratic`).
    @staticmethod
    def penalty(thetas, fields, lam, damping):
        value, gradient = penalty_lib.quadratic(thetas[0], fields[0], fields[1], lam)
        return value, [gradient]

    @staticmethod
    def explain(thetas, fields, lam):
        return penalty_lib.explain(thetas[0], fields[0], fields[1], lam)

    # Checkpoint: A at ``_fisher/<key>``, μ at ``_anchor/<key>``.
    @staticmethod
    def from_checkpoint(tables, tracking, current):
        """``{key: [A, μ]}``: the checkpoint's blocks, checked against the model (the
        variable exists, has their shape, is not excluded), then, for tracked keys the
        checkpoint lacks that are still trainable and not excluded, zero state (what a
        new EWC would track); raises a ValueError naming the first mismatch."""
        fisher, anchor = tables.get("fisher", {}), tables.get("anchor", {})
        blocks = {}
        for key in list(fisher) + [k for k in anchor if k not in fisher]:
            v = tracking.restore_target(key, "EWC state")
            if tracking.exclude(v):
                raise ValueError(
                    f"Cannot restore the EWC state of variable '{v.path}' from the checkpoint: "
                    "this EWC excludes it. Create the EWC with the `exclude` it was saved with.")
            for table, label in ((fisher, "A"), (anchor, "μ")):
                t = table.get(key)
                if t is None:
                    kind = "fisher" if table is fisher else "anchor"
                    raise ValueError(f"Cannot restore the EWC state of variable '{key}' from the "
                                     f"checkpoint: it has no {label} ('_{kind}/{key}') for it.")
                if tuple(t.shape) != shape_of(v):
                    raise ValueError(
                        f"Cannot restore the EWC state of variable '{v.path}' from the checkpoint: "
                        f"its {label} there has shape {tuple(t.shape)}, the model's variable has "
                        f"shape {shape_of(v)}. Nothing was restored into the EWC. Restore into the "
                        "model the checkpoint was written for.")
            blocks[key] = [fisher[key], anchor[key]]
        by_key = tracking.by_key() if tracking.model.built else {}
        for key in current:
            v = by_key.get(key)
            if key not in blocks and v is not None and v.trainable and not tracking.exclude(v):
                blocks[key] = Diagonal.zeros(v)
        return blocks

    # File: the header's ``variables`` and the arrays ``fisher_i``, ``anchor_i``.
    @staticmethod
    def to_file(blocks):
        return Diagonal.snapshot(blocks)

    @staticmethod
    def from_file(section, tracking, path):
        """``{key: [A, μ]}`` of a file's ``state``, each variable checked against the model."""
        model = tracking.model
        by_key = tracking.by_key()
        for key, (a, _) in section.items():
            v = by_key.get(key)
            if v is None:
                raise ValueError(
                    f"Cannot load EWC state from {path!r} onto model '{model.name}': the file "
                    f"has variable '{key}' (shape {a.shape}), which the model does not have.")
            if shape_of(v) != a.shape:
                raise ValueError(
                    f"Cannot load EWC state from {path!r} onto model '{model.name}': variable "
                    f"'{v.path}' has shape {shape_of(v)}, the file has shape {a.shape} for it.")
            if tracking.exclude(v):
                raise ValueError(f"Variable '{v.path}' has EWC state in {path!r} but is excluded.")
        return {key: list(fields) for key, fields in section.items()}

    @staticmethod
    def file_arrays(section):
        """``(header fields, arrays)`` of ``{key: (A, μ)}``."""
        header = {"variables": [{"path": key, "shape": list(np.shape(a))} for key, (a, _) in section.items()]}
        arrays = {}
        for i, (a, mu) in enumerate(section.values()):
            arrays[f"fisher_{i}"] = np.asarray(a, np.float32)
            arrays[f"anchor_{i}"] = np.asarray(mu, np.float32)
        return header, arrays

    @staticmethod
    def file_shapes(header):
        """``{array name: shape}`` the header lists; ValueError(reason) if malformed."""
        try:
            entries = [(str(e["path"]), tuple(int(d) for d in e["shape"])) for e in header["variables"]]
        except Exception as err:     # noqa: BLE001
            raise ValueError(f"bad variable list ({type(err).__name__}: {err})") from None
        if len({key for key, _ in entries}) != len(entries):
            raise ValueError("a variable path is listed twice")
        return {f"{kind}_{i}": shape for i, (_, shape) in enumerate(entries) for kind in _FIELDS}

    @staticmethod
    def read_file_arrays(header, arrays):
        return {str(entry["path"]): (arrays[f"fisher_{i}"], arrays[f"anchor_{i}"])
                for i, entry in enumerate(header["variables"])}


def check_aligned(label, values, model):
    """``values`` as a list, one array of real numbers per trainable variable of ``model``
    with its shape (Keras-style errors naming the entry)."""
    trainable = list(model.trainable_variables)
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise TypeError(f"`{label}` must be a list of arrays or tensors, one per trainable "
                        f"variable. Received: {label} of type {type(values).__name__}")
    values = list(values)
    if len(values) != len(trainable):
        raise ValueError(
            f"`{label}` must have one entry per trainable variable of model "
            f"'{model.name}' ({len(trainable)}). Received: {len(values)} entries")
    for v, t in zip(trainable, values):
        if not _is_real(t):
            raise TypeError(f"`{label}` entry for variable '{v.path}' must be an array of "
                            f"real numbers. Received: {type(t).__name__} of dtype "
                            f"{getattr(t, 'dtype', None)}")
        if tuple(np.shape(t)) != shape_of(v):
            raise ValueError(f"`{label}` entry for variable '{v.path}' must have shape "
                             f"{shape_of(v)}. Received: shape {tuple(np.shape(t))}")
    return values


def _overflow_error(path, fisher_max, state_max, *, a_overflows):
    """The merge of a finite, non-negative Fisher overflows float32 (A, or the variable's
    share of c: Σ_i A_i F_i / A'_i · (μ_i − θ_i)², anchors far apart)."""
    what = ("A = Σ_t F_t goes beyond" if a_overflows else
            "its share of the separate-mode constant c, Σ A·F/(A + F)·(μ − θ)² (anchors far "
            "apart), goes beyond")
    return ValueError(
        f"`fisher`: adding the Fisher of variable '{path}' would overflow the float32 EWC "
        f"state: {what} float32's largest value {_FLOAT32_MAX:.4g}. The state is unchanged. "
        f"Received: Fisher values up to {fisher_max:.3g} on a state A up to {state_max:.3g} "
        "(rescale the loss or the weights, or use mode='online').")


def _is_real(value):
    """Whether ``value`` is an array/tensor of real numbers (float, int or bool)."""
    dtype = getattr(value, "dtype", None)
    try:
        dtype = tf.as_dtype(dtype if dtype is not None else np.asarray(value).dtype)
    except (TypeError, ValueError):
        return False
    return dtype.is_floating or dtype.is_integer or dtype.is_bool
