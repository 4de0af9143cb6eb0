"""The Kronecker kind: one block per Dense, convolution, EinsumDense or Embedding layer, A ⊗ G.

Estimation (:mod:`fastewc.curvature`):

    F_W̄ ≈ A ⊗ G,    A = (1/N) Σ_n (1/L) Σ_l ā_nl ā_nlᵀ,    G = (1/N) Σ_n E_y[Σ_l δ_nl δ_nlᵀ]

A block covers a kernel and its bias (W̄: the kernel reshaped to (d, u), the bias as its
last row) of a layer whose rule has a Kronecker form (``kron`` in
:class:`fastewc.registry.RuleOutput`: Dense, convolution, EinsumDense and Embedding
kernels); its per-batch sums are the rule's :class:`fastewc.registry.KroneckerSums` (a, g)
and their means are A and G, finished into a :class:`fastewc.curvature.KroneckerBlock`.
An Embedding's A is diagonal (its token counts) and travels as its diagonal, a vector of
V floats, through the sums, the result, the state and the file (the diagonal form of
:mod:`fastewc.kronecker`: every function there reads a vector a as diag(a); damping adds
π√δ to a).  The plan finds the blocks and their factor shapes in its eager pass of one
example (each ``kron`` called once on zero deltas).

The factors are dense: A alone is d'² floats (the reference CNN's Dense(9216 → 128):
85M), so a call takes rows enough to amortize the float64 fold of a call of several
batches (``dense_sums``; a one-batch call has none); XLA's CPU dot for their XᵀX is slower than
oneDNN's (reference MLP, empirical: 20.3 ms with XLA against 14.9 ms without;
``benchmarks/bench_kfac.py``), so a plan with Kronecker blocks is not XLA on CPU by
default.  The sums come only from a rule's layer inputs and deltas, which the
per-example engines do not form.

State, penalty and file: a block is keyed by its variables' EWC keys, ``(kernel key, bias
key or None)``.  Its state is a list of terms (c_t, A_t, G_t, W̄_t) (:mod:`fastewc.kfac_penalty`), stored flat
(4 float32 fields a term), and its penalty

    P(θ) = λ/2 Σ_t c_t · vec(W̄ − W̄_t)ᵀ (A_t,δ ⊗ G_t,δ) vec(W̄ − W̄_t),
    ∇_W̄ P = λ Σ_t c_t A_t,δ (W̄ − W̄_t) G_t,δ

for the block's weight matrix W̄ (:func:`fastewc.kronecker.weight_matrix`) and the factors
with damping δ (:func:`fastewc.kronecker.damped_factors`).  How a task enters the terms
(separate; online with ``kfac_sum="exact"`` or ``"nearest"``) is
:func:`fastewc.kfac_penalty.merge_block`'s.  The block's variables keep a diagonal block
with A = 0 (:mod:`fastewc.blocks.diagonal`).

Checkpoint: the t-th term's fields at ``ewc/_kronecker/_terms/<kernel key>|<bias key>|<t>|<field>``
(field: coef, a, g, anchor; a diagonal A's ``a`` is a vector, and its rank says so on
restore).  File (version 2): the header's ``kronecker`` list of
``{"kernel", "bias", "coefficients", "rows", "units"}`` (plus ``"a": "diagonal"`` for a
diagonal A) and, for the j-th term over all blocks, the arrays ``kfaca_j`` (rows × rows,
or rows for a diagonal A), ``kfacg_j`` (units × units), ``kfacw_j`` (rows × units).
"""
import numpy as np
import tensorflow as tf

from fastewc import curvature, kfac_penalty, kronecker
from fastewc import penalty as penalty_lib
from fastewc.blocks.base import Block
from fastewc.blocks.diagonal import Diagonal, _path
from fastewc.blocks.task import all_finite, float32_arrays, shape_of
from fastewc.contract import KroneckerSums, few_rows, row_gram, unit_weights
from fastewc.curvature import KroneckerFisher

# Bytes a call holds per accumulated float of a plan with Kronecker blocks, at most: a call
# of several batches holds the float64 totals (8) and, while it folds a batch, that batch's
# float32 sum (4) and its float64 cast (8, which the addition writes into); at the end the
# float64 mean and its float32 cast (8 + 4) beside the totals; the small sums (at most
# engines.base.FINITE_TOGETHER_FLOATS floats each), folded as one flat vector, also their
# float32 concatenation and split (4 more each).  A one-batch call: the sum and its float32
# mean (4 + 4).
BYTES_PER_FACTOR_FLOAT = 20


FIELDS = ("coef", "a", "g", "anchor")
_ARRAYS = ("kfaca", "kfacg", "kfacw")


def block_shapes(kernel_shape, has_bias, input_rank=None, diagonal_a=False):
    """Shapes of (coef, A, G, W̄*) for a kernel of ``kernel_shape`` split after its first
    ``input_rank`` axes (:func:`fastewc.kronecker.matrix_shape`); ``diagonal_a``: A kept
    as its diagonal (rows,)."""
    rows, units = kronecker.matrix_shape(kernel_shape, input_rank)
    rows += 1 if has_bias else 0
    return (), ((rows,) if diagonal_a else (rows, rows)), (units, units), (rows, units)


def stored_input_rank(kernel, block, anchor):
    """The input rank a block's stored anchor W̄* (d', u) was made with
    (:func:`fastewc.kronecker.input_rank_of`): the state needs no field of its own."""
    return kronecker.input_rank_of(tuple(kernel.shape), int(anchor.shape[0]) - (block[1] is not None))


def terms(fields):
    """The flat fields of a block as :class:`fastewc.kfac_penalty.Term` objects."""
    return [kfac_penalty.Term(*fields[i:i + 4]) for i in range(0, len(fields), 4)]


def flat(block_terms):
    return [v for term in block_terms for v in term.values()]


def term_key(block, t, field):
    kernel, bias = block
    return f"{kernel}|{bias or ''}|{t}|{field}"


def parse_term_key(key, fields=FIELDS):
    """``(block, t, field)`` of a checkpoint key (its field one of ``fields``), or None if it
    is not one."""
    parts = key.split("|")
    if len(parts) != 4 or parts[3] not in fields or not parts[2].isdigit():
        return None
    return (parts[0], parts[1] or None), int(parts[2]), parts[3]


def _term_shapes(kernel, block, first):
    """Shapes of (coef, A, G, W̄*) for ``block`` whose first term is ``first`` (None: no term;
    its anchor gives the input rank, the rank of its A whether A is diagonal)."""
    input_rank = None if first is None else stored_input_rank(kernel, block, first[3])
    diagonal_a = first is not None and len(first[1].shape) == 1
    return block_shapes(shape_of(kernel), block[1] is not None, input_rank, diagonal_a)


def terms_from_checkpoint(table, tracking, *, label, fields, shapes_of):
    """``{block: flat fields}`` of a checkpoint's term table ``{term key: tensor}``
    (:func:`term_key`) for a kind whose blocks hold terms of ``fields`` (a Kronecker-like
    kind, named ``label`` in messages), each block checked against the model: its
    variables exist, its terms are complete and numbered from 0, and each term's fields
    have the shapes ``shapes_of(kernel, block, first term)`` gives (the first term as a
    tuple in ``fields`` order).  Raises a ValueError naming the first mismatch."""
    grouped = {}
    for key, value in table.items():
        parsed = parse_term_key(key, fields)
        if parsed is None:
            raise ValueError(f"Cannot restore EWC {label} state '{key}' from the checkpoint: "
                             f"not {'an' if label[0] in 'AEIOU' else 'a'} {label} term key.")
        block, t, field = parsed
        grouped.setdefault(block, {}).setdefault(t, {})[field] = value
    blocks = {}
    for block, block_terms in grouped.items():
        kernel = tracking.restore_target(block[0], f"EWC {label} state")
        if block[1] is not None:
            tracking.restore_target(block[1], f"EWC {label} state")
        if (sorted(block_terms) != list(range(len(block_terms)))
                or any(len(f) != len(fields) for f in block_terms.values())):
            raise ValueError(
                f"Cannot restore the EWC {label} state of '{block[0]}' from the checkpoint: its "
                f"terms are incomplete (numbers {sorted(block_terms)}, each needs {list(fields)}).")
        ordered = [tuple(block_terms[t][f] for f in fields) for t in range(len(block_terms))]
        shapes = shapes_of(kernel, block, ordered[0])
        for t, term in enumerate(ordered):
            for field, value, shape in zip(fields, term, shapes):
                if tuple(value.shape) != tuple(shape):
                    raise ValueError(
                        f"Cannot restore the EWC {label} state of '{kernel.path}' from the "
                        f"checkpoint: its term {t} field '{field}' has shape "
                        f"{tuple(value.shape)}, the model's kernel "
                        f"{shape_of(kernel)} needs {tuple(shape)}. Nothing was restored into "
                        "the EWC. Restore into the model the checkpoint was written for.")
        blocks[block] = [v for term in ordered for v in term]
    return blocks


def terms_from_file(section, tracking, path, *, label, shapes_of):
    """``{block: flat fields}`` of a file's section ``{block: [term tuple]}`` for a
    Kronecker-like kind (``label`` in messages), each block checked against the model: its
    variables exist and each term's arrays have the shapes ``shapes_of(kernel, block, first
    term or None)`` gives.  Raises a ValueError naming the first mismatch."""
    model_name, by_key = tracking.model.name, tracking.by_key()
    blocks = {}
    for block, block_terms in section.items():
        missing = [k for k in block if k is not None and k not in by_key]
        if missing:
            raise ValueError(
                f"Cannot load EWC state from {path!r} onto model '{model_name}': the file "
                f"has {label} terms for variable '{missing[0]}', which the model does not have.")
        kernel = by_key[block[0]]
        shapes = tuple(tuple(s) for s in shapes_of(kernel, block, block_terms[0] if block_terms else None))
        for term in block_terms:
            if tuple(np.shape(v) for v in term) != shapes:
                raise ValueError(
                    f"Cannot load EWC state from {path!r} onto model '{model_name}': the "
                    f"{label} terms of '{block[0]}' have shapes {[np.shape(v) for v in term]}, "
                    f"the model's kernel {shape_of(kernel)} needs {list(shapes)}.")
        blocks[block] = [v for term in block_terms for v in term]
    return blocks


def per_cotangent_sums(kron, deltas, weight, mask, *, unit):
    """A rule's Kronecker sums (``kron``, :class:`fastewc.contract.KroneckerSums` per
    block) of K cotangents whose deltas come apart, ``deltas`` a list of K (N, *probe)
    tensors (the factored engine's unrolled backward passes), with g = Σ_k g_k:

        g = Σ_k kron(δ_k, w_k, mask).g,     a, rows = kron(δ_1, w_1, mask).a, .rows

    (a and the rows depend on the layer's inputs alone; ``deltas`` of the sums are None).
    ``weight`` (K, N) the cotangents' weights, w_k its row k; ``unit``: they are
    statically 1 and N static (then the rule sees a constant row of ones:
    :func:`fastewc.contract.unit_weights` holds and it weighs no deltas).

    The rule is traced ONCE, as a ``tf.function`` of one cotangent's (1, N, *probe) deltas,
    the mask and (unless statically 1) the weight row, and that concrete function is called
    K times: the Python trace of a rule (the reference CNN's convolutions: about 90 ops a
    call, their patches mostly) is paid once per layer, not K times.  The calls are inlined
    when TensorFlow instantiates the batch function (as every nested function's are), so
    the graph that runs holds the ops the K rule calls traced in place gave (and an Identity
    per argument and output): K matmuls for the g's, and the a (and rows) of the first
    call; the others' a, which nothing reads, are pruned, as before.  The instantiation
    does not get shorter (it inlines K bodies); the trace does (README, "One traced rule
    call per layer").  No stack of the deltas (a copy of K·N·probe floats)."""
    def ones():
        return tf.ones([1, weight.shape[1]])

    if len(deltas) == 1:
        return kron(deltas[0][None], ones() if unit else weight, mask)
    structure = []          # per block: (variables, input_rank, has rows), set by the trace

    def one_cotangent(delta, mask, *weight_row):
        row = weight_row[0] if weight_row else ones()
        blocks = kron(delta[None], row, mask)
        structure[:] = [(sums.variables, sums.input_rank, sums.rows is not None) for sums in blocks]
        return [t for sums in blocks for t in (sums.a, sums.g) + ((sums.rows,) if sums.rows is not None else ())]

    def row(k):
        return [] if unit else [weight[k:k + 1]]

    traced = tf.function(one_cotangent, autograph=False).get_concrete_function(deltas[0], mask, *row(0))
    calls = [traced(d, mask, *row(k)) for k, d in enumerate(deltas)]
    blocks, i = [], 0
    for variables, input_rank, has_rows in structure:
        a, rows = calls[0][i], calls[0][i + 2] if has_rows else None
        g = tf.add_n([outputs[i + 1] for outputs in calls])
        blocks.append(KroneckerSums(variables, a, g, input_rank, rows, None))
        i += 3 if has_rows else 2
    return blocks


class Kronecker(Block):
    """A layer's Kronecker-factored Fisher block A ⊗ G over (kernel, bias) or (kernel,)."""
    kind = "kfac"
    rules_only = ("the Kronecker factors come from the factored rules' layer inputs and deltas, "
                  "which the per-example methods do not form")
    dense_sums = True
    xla_on_cpu = False
    scales_sums = True
    per_cotangent = True
    sums_over_cotangents = (False, True)     # A (the layer's inputs alone), G = Σ_k δ_kᵀ δ_k
    shared_layer_refusal = ("curvature='kfac' cannot take a shared layer: its Fisher block is not one "
                            "Kronecker product A ⊗ G.")

    def __init__(self, layer_name, variables, a_shape, g_shape, input_rank=None):
        self.layer_name = layer_name
        self.input_rank = input_rank
        self.variables = tuple(variables)
        self.sum_shapes = (tuple(a_shape), tuple(g_shape))
        self.gram_sums = (len(a_shape) == 2, False)     # A = Σ_nl (m_n/L) ā āᵀ; G is small
        path = _path(self.variables[0])
        self.sum_names = (f"{path} (Kronecker factor A)", f"{path} (Kronecker factor G)")

    # -- estimation ------------------------------------------------------------------------
    @classmethod
    def blocks_of(cls, layer, result):
        if result.kron is None:
            return []
        probe = result.probe
        delta = tf.zeros((1,) + tuple(probe.shape), tf.float32)
        return [cls(layer.name, sums.variables, sums.a.shape, sums.g.shape, sums.input_rank)
                for sums in result.kron(delta, tf.ones([1, probe.shape[0]]), tf.ones([probe.shape[0]]))]

    @classmethod
    def rule_sums(cls, result, delta, weight, mask, scale=None):
        """The rule's (a, g) per block; with ``scale`` (a one-batch call's 1/N) times it,
        at no pass over them: g through the weights (it is linear in them; g · scale where
        the weights are statically 1, :func:`fastewc.contract.unit_weights`: the rule
        then weighs no deltas, and g is u² floats), a through the
        rows (:func:`fastewc.contract.row_gram`, √scale folded into them) where the rule
        gives them and they are fewer floats than a (the reference CNN's 256 rows of
        9217, against its 9217² a: the rule's own a is then unused and pruned from the
        graph), else a · scale (a is smaller than the rows it came from).

        ``delta`` a list of the K cotangents' deltas (``per_cotangent``): g = Σ_k g_k from
        the rule traced once for one cotangent and called K times
        (:func:`per_cotangent_sums`), with no stack of the deltas."""
        unit = scale is None or unit_weights(weight)   # then g · scale: a pass over g, not the deltas
        weight = weight if unit else weight * scale
        if isinstance(delta, list):
            blocks = per_cotangent_sums(result.kron, delta, weight, mask,       # each cotangent's weights, static:
                                        unit=unit and weight.shape.is_fully_defined())
        else:
            blocks = result.kron(delta, weight, mask)
        if scale is None:
            return {(cls.kind, id(sums.variables[0])): (sums.a, sums.g) for sums in blocks}
        out = {}
        for sums in blocks:
            rows = sums.rows
            by_rows = rows is not None and sums.a.shape.rank == 2 and few_rows(rows)
            out[(cls.kind, id(sums.variables[0]))] = (row_gram(rows, scale) if by_rows else sums.a * scale,
                                                      sums.g * scale if unit else sums.g)
        return out

    def finish(self, means):
        """The :class:`fastewc.curvature.KroneckerBlock` (factors symmetric up to the
        rounding of their matmuls, XᵀX: symmetrizing the reference CNN's 9217² A would
        cost 0.4 s, and the penalty's gradient 2AΔG is off by that rounding only)."""
        return curvature.KroneckerBlock(self.layer_name, self.variables, means[0], means[1], self.input_rank)

    @classmethod
    def assemble(cls, blocks, parts, variables):
        """A :class:`fastewc.KroneckerFisher`: the Kronecker blocks, and the diagonal of
        every variable they do not cover (None where one does)."""
        diagonal = {id(b.variables[0]): p for b, p in zip(blocks, parts) if isinstance(b, Diagonal)}
        return curvature.KroneckerFisher([p for b, p in zip(blocks, parts) if isinstance(b, cls)],
                                         [diagonal.get(id(v)) for v in variables], list(variables))

    @classmethod
    def check_memory(cls, plan, device_bytes):
        """Raise before any pass when the plan's sums alone would take more than half of
        the device's memory (A is d'² floats: a Dense layer with 25 088 inputs, VGG16's
        first, has a 2.5 GB A in float32), naming the layer with the largest factor."""
        need = BYTES_PER_FACTOR_FLOAT * sum(int(np.prod(shape)) for shape in plan.shapes)
        if need <= device_bytes // 2:
            return
        largest = max((b for b in plan.blocks if isinstance(b, cls)), key=lambda b: int(np.prod(b.sum_shapes[0])))
        raise ValueError(
            f"curvature='kfac' needs about {need / 2**30:.1f} GiB for its Kronecker factors, more than "
            f"half of this device's {device_bytes / 2**30:.1f} GiB: layer '{largest.layer_name}' alone has "
            f"an A of shape {largest.sum_shapes[0]} (A is d'² floats for d' inputs). Use "
            "curvature='diagonal' for this model, or reduce the layer's inputs (e.g. pool before it).")

    # -- state -------------------------------------------------------------------------
    OPTIONS = ("kfac_sum", "damping")
    MODES = ("separate", "online")
    METHOD, TITLE = "kfac", "KFAC-EWC"
    TABLES = {"terms": "_kronecker/_terms"}
    FILE_FIELD, FILE_VERSION = "kronecker", 2

    @staticmethod
    def addresses(key, n):
        return [("terms", term_key(key, i // 4, FIELDS[i % 4]), f"kfac_{FIELDS[i % 4]}") for i in range(n)]

    @staticmethod
    def model_variables(key, by_key):
        return tuple(by_key[k] for k in key if k is not None)

    @staticmethod
    def label(key):
        return key[0]

    @staticmethod
    def num_terms(fields):
        return len(fields) // 4

    @staticmethod
    def snapshot(blocks):
        """``{(kernel key, bias key or None): [(c, A, G, W̄*)]}``, float32 NumPy arrays."""
        return {key: [float32_arrays(term.values()) for term in terms(fields)] for key, fields in blocks.items()}

    @staticmethod
    def check_options(mode, kfac_sum):
        if kfac_sum == "nearest" and mode == "separate":
            raise ValueError(
                "`kfac_sum`='nearest' applies to mode='online' only: separate-mode tasks keep their "
                "own anchors, and their Kronecker terms are summed exactly. Received: "
                "kfac_sum='nearest' with mode='separate'")

    # The task.
    @staticmethod
    def check_result(result, source, tracking):
        if not isinstance(result, KroneckerFisher):
            raise TypeError(
                "`fisher` must be a fastewc.KroneckerFisher (fastewc.kfac_fisher's result) for "
                f"an EWC with curvature='kfac'. Received: fisher of type {type(result).__name__}")
        trainable = list(source.trainable_variables)
        if [id(v) for v in result.variables] != [id(v) for v in trainable]:
            raise ValueError(
                f"`fisher` was computed for other trainable variables than model '{source.name}' "
                f"has now ({len(result.variables)} then, {len(trainable)} now). Received: a "
                "KroneckerFisher of another model or an older state of this one")

    @staticmethod
    def estimate(result, source, tracking):
        """``{block key: (layer name, A, G)}`` of the result's blocks this EWC penalizes
        (a block whose variables are all excluded is skipped; part of one excluded raises)."""
        blocks = {}
        for block in result.blocks:
            excluded = [tracking.exclude(v) for v in block.variables]
            if all(excluded):
                continue
            if any(excluded):
                raise ValueError(
                    f"`exclude` covers part of layer '{block.layer}''s Kronecker block "
                    f"{[v.path for v in block.variables]}: exclude all of its variables or none.")
            keys = tuple(tracking.key(v) for v in block.variables)
            blocks[keys if len(keys) == 2 else keys + (None,)] = (block.layer, block.a, block.g, block.input_rank)
        return blocks

    @staticmethod
    def merge(current, task, settings, tracking):
        """Every block's new terms (nothing assigned): the task's blocks merged at the
        task's weights (:func:`fastewc.kfac_penalty.merge_block`), the others decayed
        (:func:`fastewc.kfac_penalty.decay_block`).  Raises for factors that are not finite
        or have a negative diagonal, and for terms float32 cannot hold, naming the layer."""
        mode, kfac_sum, gamma = settings.mode, settings.kfac_sum, settings.gamma
        pending = {}

        def anchor_of(block, input_rank):
            return kronecker.weight_matrix([task.theta[k] if k in task.theta else
                                            penalty_lib.read_float32(task.by_key[k])
                                            for k in block if k is not None], input_rank)

        for block, (layer, a, g, input_rank) in task.estimates.get(Kronecker.kind, {}).items():
            for label, factor in (("A", a), ("G", g)):
                if not (all_finite([factor]) and bool(tf.reduce_all(kronecker.diagonal_of(factor) >= 0))):
                    raise ValueError(
                        f"`fisher`: the Kronecker factor {label} of layer '{layer}' must be finite "
                        "with a non-negative diagonal. Received: NaN, Inf or a negative diagonal")
            pending[block], _ = kfac_penalty.merge_block(
                terms(current.get(block, [])), (tf.cast(a, tf.float32), tf.cast(g, tf.float32),
                                                  anchor_of(block, input_rank)),
                mode=mode, kfac_sum=kfac_sum, gamma=gamma)
        for block, fields in current.items():
            if block not in pending:
                input_rank = stored_input_rank(task.by_key[block[0]], block, terms(fields)[0].anchor)
                pending[block] = kfac_penalty.decay_block(terms(fields), anchor_of(block, input_rank), mode=mode,
                                                          gamma=gamma)
        for block, block_terms in pending.items():
            if not all_finite(flat(block_terms)):
                raise ValueError(
                    f"`fisher`: adding this task would make the Kronecker terms of '{block[0]}' not "
                    "finite in float32 (the weights or the factors are too large). The state is "
                    "unchanged.")
        return {block: flat(block_terms) for block, block_terms in pending.items()}, 0.0

    # The penalty (:func:`fastewc.kfac_penalty.block_penalty`).
    @staticmethod
    def penalty(thetas, fields, lam, damping):
        return kfac_penalty.block_penalty(thetas, [term.values() for term in terms(fields)], lam, damping)

    @staticmethod
    def explain(thetas, fields, lam):
        return kfac_penalty.explain(thetas, lam)

    # Checkpoint.
    @staticmethod
    def from_checkpoint(tables, tracking, current):
        """``{block: fields}`` of a checkpoint's term fields ``{term key: tensor}``: every
        term complete (c, A, G, W̄*), numbered from 0, shaped from the model's kernel."""
        return terms_from_checkpoint(tables.get("terms", {}), tracking, label="Kronecker",
                                     fields=FIELDS, shapes_of=_term_shapes)

    # File.
    @staticmethod
    def to_file(blocks):
        return Kronecker.snapshot(blocks)

    @staticmethod
    def from_file(section, tracking, path):
        """``{block: fields}`` of a file's ``kronecker`` section, each block checked against
        the model (its variables exist, the terms' shapes follow its kernel)."""
        return terms_from_file(section, tracking, path, label="Kronecker", shapes_of=_term_shapes)

    @staticmethod
    def file_arrays(section):
        """``(header fields, arrays)`` of ``{block: [(c, A, G, W̄*)]}``."""
        entries, arrays, j = [], {}, 0
        for (kernel, bias), block_terms in section.items():
            rows, units = (np.shape(block_terms[0][3]) if block_terms else (0, 0))
            entries.append({"kernel": kernel, "bias": bias, "rows": int(rows), "units": int(units),
                            "coefficients": [float(t[0]) for t in block_terms]})
            if block_terms and np.ndim(block_terms[0][1]) == 1:
                entries[-1]["a"] = "diagonal"
            for _, a, g, anchor in block_terms:
                for kind, value in zip(_ARRAYS, (a, g, anchor)):
                    arrays[f"{kind}_{j}"] = np.asarray(value, np.float32)
                j += 1
        return {"kronecker": entries}, arrays

    @staticmethod
    def file_shapes(header):
        """``{array name: shape}`` of the terms the header lists; ValueError(reason) if malformed."""
        shapes, j = {}, 0
        try:
            for block in header.get("kronecker", []):
                rows, units = int(block["rows"]), int(block["units"])
                if block.get("a", "diagonal") != "diagonal":
                    raise ValueError(f"'a' must be 'diagonal' or absent, not {block['a']!r}")
                a_shape = (rows,) if "a" in block else (rows, rows)
                for _ in block["coefficients"]:
                    shapes.update({f"kfaca_{j}": a_shape, f"kfacg_{j}": (units, units),
                                   f"kfacw_{j}": (rows, units)})
                    j += 1
        except Exception as err:     # noqa: BLE001
            raise ValueError(f"bad Kronecker block list ({type(err).__name__}: {err})") from None
        return shapes

    @staticmethod
    def read_file_arrays(header, arrays):
        section, j = {}, 0
        for block in header.get("kronecker", []):
            block_terms = []
            for c in block["coefficients"]:
                block_terms.append((np.float32(c),) + tuple(arrays[f"{kind}_{j}"] for kind in _ARRAYS))
                j += 1
            section[(str(block["kernel"]), None if block["bias"] is None else str(block["bias"]))] = block_terms
        return section
