"""The EKFAC kind: a Kronecker block's eigenbasis with per-coordinate second moments in it
(George et al. 2018, eigenvalue-corrected KFAC).

For a layer's weight matrix W̄ (d', u) (:func:`fastewc.kronecker.weight_matrix`) with
Kronecker factors A = U_A Λ_A U_Aᵀ and G = U_G Λ_G U_Gᵀ (:mod:`fastewc.blocks.kronecker`),
EKFAC keeps the eigenbases and replaces the Kronecker eigenvalues λ_A,i λ_G,j by the second
moments of the per-example gradients ḡ_n = Σ_l ā_nl δ_nlᵀ in that basis:

    S_ij = (1/N) Σ_n E_y[ (U_Aᵀ ḡ_n U_G)_ij² ],        F_W̄ ≈ (U_A ⊗ U_G) diag(vec S) (U_A ⊗ U_G)ᵀ

(with one position per example, (U_Aᵀ ā_n)_i² (U_Gᵀ δ_n)_j²).  It is the diagonal in the
Kronecker eigenbasis that is closest to the true block in Frobenius norm; S = Λ_A ⊗ Λ_G
gives KFAC back.

Estimation, two passes over the data (``passes = 2``, :mod:`fastewc.blocks.plan`): the
first gives the Kronecker factors' sums (a, g) as the Kronecker kind's, finished into the
eigenbases (:func:`eigenbasis`); the second, with those bases, the sums

    Σ_k Σ_n w_kn (U_Aᵀ ḡ_kn U_G)²,        ḡ_kn = Σ_l ā_nl δ_knlᵀ

from the rule's per-example rows (:class:`fastewc.contract.KroneckerSums` ``rows``,
``deltas``), whose mean is S.  With one position per example (a Dense layer on vectors)
(U_Aᵀ ḡ_kn U_G)² = (U_Aᵀ ā_n)² (U_Gᵀ δ_kn)²ᵀ, one (d' × N)(N × u) matmul of squares; with L
positions (a sequence, a convolution's patches) the projected per-example gradients are
formed, K · N · d' · u floats a call.  The second pass costs about the first one again
(one forward and K backward passes) plus those products.  Sampled labels are the same in
both passes (the same seed).

State, penalty and file: a block is keyed ``(kernel key, bias key or None)`` as the
Kronecker kind's, and holds terms (U_A, U_G, S, W̄*), in online mode followed by the
eigenvalues (λ_A', λ_G') of its decayed factor sums.  How a task enters them (:meth:`EKFAC.merge`):

* ``mode="separate"``: one term per task, (U_A,t, U_G,t, S_t, W̄_t): Kirkpatrick et al.'s
  sum of per-task penalties, exactly; T tasks cost T terms.
* ``mode="online"`` (Schwarz et al. 2018: F̃_t = γ F̃_{t−1} + F_t at the latest anchor):
  ONE term, in the eigenbasis V = V_A ⊗ V_G of the decayed factor sums

      A_sum = γ A' + A_t,   G_sum = γ G' + G_t,                    (:func:`online_term`)

  whose eigenvalues the state keeps beside the term: the term's basis is their
  eigenbasis, A_sum = V_A diag(λ_A) V_Aᵀ, so the next task rebuilds A' = V_A' diag(λ_A')
  V_A'ᵀ (G' alike; :func:`factor`, float64, from float32 V and λ: A' as stored up to
  float32 rounding), and a task's A_t = U_A diag(λ_A,t) U_Aᵀ from its block's bases and
  eigenvalues (:class:`EKFACBlock` ``lam_a``, ``lam_g``).  A decayed sum of
  terms in different bases is diagonal in none, so each is replaced by the diagonal in
  V closest to it in Frobenius norm (the principle that defines EKFAC's S): for a term
  F' = U' diag(vec S') U'ᵀ, U' = U_A' ⊗ U_G', conjugation by the orthogonal V keeps
  Frobenius distances, so the closest V diag(x) Vᵀ has x = diag(Vᵀ F' V), and with
  Q = Vᵀ U' = P_A ⊗ P_G, P_A = V_Aᵀ U_A', P_G = V_Gᵀ U_G',

      x_(ij) = Σ_(kl) Q_(ij),(kl)² S'_kl = Σ_kl (P_A)_ik² S'_kl (P_G)_jl²,
      proj(S', U' → V) = (P_A ⊙ P_A) S' (P_G ⊙ P_G)ᵀ                   (:func:`project`)

  and the state becomes (V_A, V_G, γ proj(S', U' → V) + proj(S_t, U_t → V), W̄_t, A_sum,
  G_sum).  Why this basis: the newest task's eigenbasis U_t may hold little of the old
  tasks' directions when their inputs differ (permuted inputs: each task its own U_A),
  and their precision projected onto it keeps its trace but is spread over the new
  coordinates; A_sum = Σ_s γ^(t−s) A_s (and G_sum) weighs every task's input (output)
  directions by its factor, so its eigenbasis serves the old tasks and the new one.
  What each projection keeps and loses:

  - the old term: diag(Vᵀ F' V) keeps tr F' (P ⊙ P of an orthogonal P is doubly
    stochastic: its rows and columns are unit vectors) and drops F''s part off V's
    diagonal (none when V and U' agree up to signs and permutations: then S' permuted);
  - the new task: the exact EKFAC of F_t in V, diag(Vᵀ F_t V), needs the per-example
    gradients in V, i.e. V before the second pass; but the second pass projects on the
    first pass's bases (:class:`SecondMoments`, prepared by the estimator, which does
    not see the EWC's state: handing the state's factors to it would change
    ``EWC.consolidate`` and the estimator, outside the block modules, and make a Fisher
    result depend on the EWC).  So the task's own EKFAC F̂_t = U_t diag(S_t) U_tᵀ is
    projected: diag(Vᵀ F̂_t V) = diag(Vᵀ F_t V) − diag(Vᵀ (F_t − F̂_t) V).  It loses the
    last term (F_t − F̂_t is F_t's part off U_t's diagonal, as seen by V's diagonal; zero
    when V = U_t) and keeps tr F_t (tr F̂_t = tr F_t).

  So Σ S = γ Σ S' + Σ S_t: the state's trace is the exact decayed sum's, tr F̃_t =
  γ tr F̃_{t−1} + tr F_t, and S ≥ 0.  With no factor sums before (the first task, or an
  online state written before they were kept: A' unknown, taken as 0) A_sum = A_t,
  whose eigenbasis is the task's own: V = U_t, S_t unprojected (the rule of the code
  before, which projected the old term onto the newest basis).  A task's block must
  carry its factors' eigenvalues (:class:`EKFACBlock` ``lam_a``, ``lam_g``: the
  estimator's do).  A block the task does not estimate (its variables frozen) has its S
  and eigenvalues decayed by γ (the same V) and its anchor moved to the task's weights,
  as the diagonal online EWC does with F = 0.  Memory: one term per block whatever the
  tasks, and d' + u eigenvalues a block beyond the term (an estimate carries the same
  d' + u beside its bases); a task costs the rebuilt factors and two more
  eigendecompositions, of A_sum and G_sum, and the projections, O(d'³ + u³ + d'²u + d'u²)
  (float64).

The penalty, with damping δ ≥ 0 (the EWC's ``damping``),

    P(θ) = λ/2 Σ_t Σ_ij (S_t + δ)_ij (U_A,tᵀ (W̄ − W̄_t) U_G,t)_ij²,
    ∇_W̄ P = λ Σ_t U_A,t ((S_t + δ) ⊙ (U_A,tᵀ (W̄ − W̄_t) U_G,t)) U_G,tᵀ

costs four matrix products per term, O(d'²u + d'u²).  δ is Tikhonov damping of the
whole block: U (diag(vec S) + δ I) Uᵀ = F + δ I (the same eigenbasis, eigenvalues
S + δ), per term (T separate terms add T δ I).  It is not the Kronecker kind's damping,
the factored (A + π√δ I) ⊗ (G + √δ/π I) = A ⊗ G + δ I + π√δ I ⊗ G + (√δ/π) A ⊗ I
(:func:`fastewc.kronecker.damped_factors`), which adds the two cross terms as well; with
δ = 0 the penalty is S's as estimated (a PSD precision: nothing is inverted).  The
block's variables keep a diagonal block with A = 0 (:mod:`fastewc.blocks.diagonal`).

Checkpoint: ``ewc/_ekfac/_terms/<kernel key>|<bias key>|<t>|<field>`` (field: u_a, u_g, s,
anchor) and an online block's eigenvalues at ``ewc/_ekfac/_eigenvalues/<kernel
key>|<bias key>|<lam_a or lam_g>``.  File: the header's ``ekfac`` list of ``{"kernel",
"bias", "terms", "rows", "units"}`` (plus ``"eigenvalues": true`` for an online block's
eigenvalues) and, for the j-th term over all blocks, the arrays ``ekfua_j`` (rows × rows),
``ekfug_j`` (units × units), ``ekfs_j`` and ``ekfw_j`` (rows × units); for the i-th block
with eigenvalues, ``ekfla_i`` (rows) and ``ekflg_i`` (units).  A file with eigenvalues
is version 3 (:meth:`EKFAC.file_version`), which fastewc before them refuses by its
version; one without (separate mode) stays version 2.  The eigenvalues are optional in
both, so files and checkpoints written before them, separate or online, load as they
did (an online one continues with its factor sums unknown, above).
"""
import typing

import numpy as np
import tensorflow as tf

from fastewc import curvature, kronecker
from fastewc import penalty as penalty_lib
from fastewc.blocks.base import Block
from fastewc.blocks.diagonal import Diagonal, _path
from fastewc.blocks.kronecker import (Kronecker, block_shapes, stored_input_rank, term_key,
                                      terms_from_checkpoint, terms_from_file)
from fastewc.blocks.task import all_finite, float32_arrays, shape_of

FIELDS = ("u_a", "u_g", "s", "anchor")
EIGENVALUES = ("lam_a", "lam_g")   # an online block's factor sums' eigenvalues, after its term
_ARRAYS = ("ekfua", "ekfug", "ekfs", "ekfw")
_EIGENVALUE_ARRAYS = ("ekfla", "ekflg")


class EKFACBlock(typing.NamedTuple):
    """One layer's EKFAC block (float32): F_W̄ ≈ (U_A ⊗ U_G) diag(vec S) (U_A ⊗ U_G)ᵀ."""
    layer: str              # the layer's name
    variables: tuple        # (kernel, bias) or (kernel,)
    u_a: tf.Tensor          # (d', d') orthogonal: the eigenvectors of A, as columns
    u_g: tf.Tensor          # (u, u) orthogonal: the eigenvectors of G
    s: tf.Tensor            # (d', u) ≥ 0: the second moments in that basis
    input_rank: typing.Optional[int] = None
    lam_a: typing.Optional[tf.Tensor] = None   # (d',) the eigenvalues of A: A = U_A diag(λ_A) U_Aᵀ
    lam_g: typing.Optional[tf.Tensor] = None   # (u,) G's (mode="online" merges A, G: module docstring)


class EKFACFisher(curvature.KroneckerFisher):
    """The result of a ``curvature="ekfac"`` Fisher: ``blocks`` are :class:`EKFACBlock`,
    ``diagonal`` and ``variables`` as :class:`fastewc.KroneckerFisher`'s."""
    __slots__ = ()

    def full_diagonal(self):
        """The diagonal of the whole approximation per variable: for a block,
        diag_(ij) = Σ_kl U_A,ik² S_kl U_G,jl² = (U_A ⊙ U_A) S (U_G ⊙ U_G)ᵀ."""
        out = {id(v): f for v, f in zip(self.variables, self.diagonal) if f is not None}
        for block in self.blocks:
            diag = tf.matmul(tf.matmul(tf.square(block.u_a), block.s), tf.square(block.u_g), transpose_b=True)
            shapes = [tuple(v.shape) for v in block.variables]
            for v, part in zip(block.variables, kronecker.split_matrix(diag, shapes, block.input_rank)):
                out[id(v)] = part
        return [out[id(v)] for v in self.variables]


def eigenbasis(factor):
    """``(eigenvalues, eigenvectors)`` of a symmetric PSD factor, float64 (symmetrized
    first; eigenvalues clipped at 0, the rounding of a PSD matrix's)."""
    factor = tf.cast(factor, tf.float64)
    values, vectors = tf.linalg.eigh(0.5 * (factor + tf.transpose(factor)))
    return tf.maximum(values, 0.0), vectors


def factor(u, lam):
    """U diag(λ) Uᵀ, float64: a factor from its eigenbasis and eigenvalues."""
    u = tf.cast(u, tf.float64)
    return tf.matmul(u * tf.cast(lam, tf.float64)[None, :], u, transpose_b=True)


def second_moments(per_example, u_a, u_g, weights=None):
    """S = Σ_n w_n (U_Aᵀ ḡ_n U_G)² / Σ_n w_n from per-example weight-matrix gradients
    ``per_example`` (N, d', u) (each ḡ_n = Σ_l ā_nl δ_nlᵀ for one sampled or weighted
    label; ``weights`` (N,) the labels' weights, None: 1), float64: the EKFAC correction."""
    g = tf.cast(per_example, tf.float64)
    projected = tf.einsum("ai,naj,jb->nib", tf.cast(u_a, tf.float64), g, tf.cast(u_g, tf.float64))
    w = tf.ones([tf.shape(g)[0]], tf.float64) if weights is None else tf.cast(weights, tf.float64)
    return tf.einsum("n,nij->ij", w, tf.square(projected)) / tf.reduce_sum(w)


def project(s, u_a_old, u_g_old, u_a, u_g):
    """S_proj = (P_A ⊙ P_A) S (P_G ⊙ P_G)ᵀ, P_A = U_Aᵀ U_A,old, P_G = U_Gᵀ U_G,old (float64):
    the diagonal in the basis (U_A, U_G) closest in Frobenius norm to the EKFAC term
    (U_A,old ⊗ U_G,old) diag(vec S) (U_A,old ⊗ U_G,old)ᵀ, with the same sum as S (module
    docstring: the online merge)."""
    s, u_a_old, u_g_old, u_a, u_g = (tf.cast(x, tf.float64) for x in (s, u_a_old, u_g_old, u_a, u_g))
    p_a = tf.square(tf.matmul(u_a, u_a_old, transpose_a=True))
    p_g = tf.square(tf.matmul(u_g, u_g_old, transpose_a=True))
    return tf.matmul(tf.matmul(p_a, s), p_g, transpose_b=True)


def online_term(fields, task, gamma):
    """``[V_A, V_G, S, λ_A, λ_G]`` (float32): a task (U_A, U_G, S_t, λ_A,t, λ_G,t) merged
    into an online block's ``fields`` (its one term (V_A', V_G', S', W̄') and its factor
    sums' eigenvalues (λ_A', λ_G'); none before its first task), float64 (module docstring):

        A_sum = γ V_A' diag(λ_A') V_A'ᵀ + U_A diag(λ_A,t) U_Aᵀ   (G_sum alike),
        (λ_A, V_A), (λ_G, V_G) their eigendecompositions,
        S = γ proj(S', U' → V) + proj(S_t, U_t → V)                     (:func:`project`)

    With no factor sums before (the first task, or a state written before they were kept,
    A' unknown) A_sum = A_t, and the basis is the task's own: V = U_t, λ = λ_t and S_t
    unprojected."""
    u_a, u_g, s, lam_a, lam_g = (tf.cast(x, tf.float64) for x in task)
    terms, eigenvalues = _split(fields)
    if eigenvalues is None:
        (lam_a, v_a), (lam_g, v_g), new = (lam_a, u_a), (lam_g, u_g), s
    else:
        (v_a_old, v_g_old, _, _), = terms
        (lam_a, v_a), (lam_g, v_g) = (
            eigenbasis(gamma * factor(v_old, lam_old) + factor(u, lam))
            for v_old, lam_old, u, lam in ((v_a_old, eigenvalues[0], u_a, lam_a),
                                           (v_g_old, eigenvalues[1], u_g, lam_g)))
        new = project(s, u_a, u_g, v_a, v_g)
    old = tf.zeros_like(new)
    for u_a_old, u_g_old, s_old, _ in terms:
        old += project(s_old, u_a_old, u_g_old, v_a, v_g)
    return [tf.cast(x, tf.float32) for x in (v_a, v_g, gamma * old + new, lam_a, lam_g)]


def _terms(fields):
    return [fields[i:i + 4] for i in range(0, len(fields), 4)]


def _split(fields):
    """``(terms, eigenvalues)`` of a block's flat fields: its (U_A, U_G, S, W̄*) terms and,
    after them, an online block's factor sums' eigenvalues (λ_A', λ_G') (None: not kept,
    separate mode or a state written before them)."""
    n = len(fields) - len(fields) % 4
    return _terms(fields[:n]), (tuple(fields[n:]) or None)


def _with_eigenvalues(fields, eigenvalues, where):
    """``fields`` (one block's checked term fields) with its factor sums' eigenvalues
    (λ_A', λ_G') after them, checked: a block with them has one term (online mode), λ_A' of
    U_A's columns and λ_G' of U_G's.  ``where`` (naming the block and the source) starts the
    ValueError."""
    if len(fields) != 4 or any(f is None for f in eigenvalues):
        raise ValueError(
            f"{where}: its factor sums' eigenvalues (λ_A', λ_G') need one term (online mode) and "
            f"both vectors. Received: {len(fields) // 4} term(s) and the eigenvalues "
            f"{[name for name, f in zip(EIGENVALUES, eigenvalues) if f is not None]}. Nothing was changed.")
    for name, value, term_field in zip(EIGENVALUES, eigenvalues, fields[:2]):
        if tuple(np.shape(value)) != tuple(term_field.shape[1:]):
            raise ValueError(
                f"{where}: its eigenvalues '{name}' have shape {tuple(np.shape(value))}, its term's "
                f"basis needs {tuple(term_field.shape[1:])}. Nothing was changed.")
    return list(fields) + list(eigenvalues)


def eigenvalue_key(block, field):
    """A block's eigenvalues' checkpoint key, ``<kernel key>|<bias key>|<field>`` (lam_a or
    lam_g)."""
    kernel, bias = block
    return f"{kernel}|{bias or ''}|{field}"


def _shapes(kernel, block, first):
    """Shapes of (U_A, U_G, S, W̄*) for ``block`` whose first term is ``first`` (None: no
    term; its anchor gives the input rank)."""
    input_rank = None if first is None else stored_input_rank(kernel, block, first[3])
    _, a, g, w = block_shapes(shape_of(kernel), block[1] is not None, input_rank)
    return a, g, w, w


class SecondMoments(Block):
    """The second pass of an EKFAC block: the sums Σ_kn w_kn (U_Aᵀ ḡ_kn U_G)² (d', u) in
    the first pass's eigenbases, held in variables (:meth:`prepare`: no retrace per call)."""
    kind = "ekfac"
    own_sums = True
    sums_over_cotangents = (True,)           # S = Σ_k Σ_n w_kn (U_Aᵀ ḡ_kn U_G)²

    def __init__(self, block):
        self.layer_name, self.variables = block.layer_name, block.variables
        (rows, _), (units, _) = block.sum_shapes
        self.sum_shapes = ((rows, units),)
        self.sum_names = (f"{_path(self.variables[0])} (EKFAC second moments S)",)
        self.u_a = tf.Variable(tf.zeros((rows, rows)), trainable=False, name="ekfac_u_a")
        self.u_g = tf.Variable(tf.zeros((units, units)), trainable=False, name="ekfac_u_g")

    def prepare(self, first):
        """Take the first pass's eigenbases (an :class:`EKFACBlock`)."""
        self.u_a.assign(first.u_a)
        self.u_g.assign(first.u_g)

    def rule_sums(self, result, delta, weight, mask):
        for sums in result.kron(delta, weight, mask):
            if sums.variables[0] is self.variables[0]:
                return {self.key: (self._sums(sums, weight),)}
        return {}

    def _sums(self, sums, weight):
        if sums.rows is None:
            raise ValueError(f"curvature='ekfac' needs the per-example rows of layer '{self.layer_name}': "
                             "its rule's KroneckerSums has rows=None. Use curvature='kfac' for it.")
        p = tf.einsum("nld,de->nle", sums.rows, self.u_a)             # U_Aᵀ ā_nl
        q = tf.einsum("knlu,uv->knlv", sums.deltas, self.u_g)         # U_Gᵀ δ_knl
        if sums.rows.shape[1] == 1:        # one position: (U_Aᵀ ā)² (Σ_k w (U_Gᵀ δ)²)ᵀ
            d = tf.einsum("kn,knu->nu", weight, tf.square(q[:, :, 0]))
            return tf.matmul(tf.square(p[:, 0]), d, transpose_a=True)
        projected = tf.einsum("nld,knlu->kndu", p, q)
        return tf.einsum("kn,kndu->du", weight, tf.square(projected))

    def finish(self, means, first):
        """The block's :class:`EKFACBlock` with S = the mean of the sums."""
        return first._replace(s=means[0])


class EKFAC(Kronecker):
    """A layer's EKFAC block over (kernel, bias) or (kernel,): the Kronecker kind's sums,
    finished into its eigenbasis (module docstring)."""
    kind = "ekfac"
    passes = 2
    shared_layer_refusal = ("curvature='ekfac' cannot take a shared layer: its Fisher block is not "
                            "one Kronecker eigenbasis.")

    # -- estimation ------------------------------------------------------------------------
    def finish(self, means):
        """The first pass's :class:`EKFACBlock`: A and G's eigenbases, S = λ_A λ_Gᵀ (KFAC's
        block in its eigenbasis; the second pass replaces it), and their eigenvalues λ_A,
        λ_G (what the online merge sums, as A = U_A diag(λ_A) U_Aᵀ: d' + u floats a block
        beside the bases)."""
        (lam_a, u_a), (lam_g, u_g) = eigenbasis(means[0]), eigenbasis(means[1])
        s = lam_a[:, None] * lam_g[None, :]
        return EKFACBlock(self.layer_name, self.variables, *(tf.cast(x, tf.float32) for x in (u_a, u_g, s)),
                          self.input_rank, tf.cast(lam_a, tf.float32), tf.cast(lam_g, tf.float32))

    @classmethod
    def blocks_of(cls, layer, result):
        """The Kronecker kind's blocks whose A is a matrix.  A diagonal A (an Embedding
        table's token counts, :mod:`fastewc.rules.embedding`) keeps its diagonal block: its
        eigenbasis is the identity and the projected gradients a scatter over the table,
        which the second pass does not form."""
        return [block for block in super().blocks_of(layer, result) if len(block.sum_shapes[0]) == 2]

    def second_pass(self):
        return SecondMoments(self)

    @classmethod
    def assemble(cls, blocks, parts, variables):
        """An :class:`EKFACFisher`: the EKFAC blocks, and the diagonal of every variable
        they do not cover (None where one does)."""
        diagonal = {id(b.variables[0]): p for b, p in zip(blocks, parts) if isinstance(b, Diagonal)}
        return EKFACFisher([p for b, p in zip(blocks, parts) if isinstance(b, cls)],
                           [diagonal.get(id(v)) for v in variables], list(variables))

    # -- state -------------------------------------------------------------------------
    OPTIONS = ("damping",)   # δ: S + δ, Tikhonov damping of the whole block (module docstring)
    MODES = ("separate", "online")
    METHOD, TITLE = "ekfac", "EKFAC-EWC"
    TABLES = {"ekfac_terms": "_ekfac/_terms", "ekfac_eigenvalues": "_ekfac/_eigenvalues"}
    FILE_FIELD, FILE_VERSION = "ekfac", 2
    EIGENVALUES_FILE_VERSION = 3     # a section with an online block's eigenvalues

    @classmethod
    def file_versions(cls):
        return (cls.FILE_VERSION, cls.EIGENVALUES_FILE_VERSION)

    @classmethod
    def file_version(cls, section):
        """3 when a block carries its factor sums' eigenvalues (an online state: fastewc
        before them refuses the file by its version), else 2 (separate mode: as before)."""
        return (cls.EIGENVALUES_FILE_VERSION if any(values is not None for _, values in section.values())
                else cls.FILE_VERSION)

    @staticmethod
    def addresses(key, n):
        terms = n - n % 4
        return ([("ekfac_terms", term_key(key, i // 4, FIELDS[i % 4]), f"ekfac_{FIELDS[i % 4]}")
                 for i in range(terms)]
                + [("ekfac_eigenvalues", eigenvalue_key(key, f), f"ekfac_{f}") for f in EIGENVALUES[:n - terms]])

    @staticmethod
    def num_terms(fields):
        return len(fields) // 4

    @staticmethod
    def snapshot(blocks):
        """``{(kernel key, bias key or None): [(U_A, U_G, S, W̄*)]}``, float32 NumPy arrays."""
        return {key: [float32_arrays(term) for term in _split(fields)[0]] for key, fields in blocks.items()}

    @staticmethod
    def eigenvalues(blocks):
        """``{block key: (λ_A', λ_G')}`` of the online blocks that keep their factor sums'
        eigenvalues (in their term's bases), float32 NumPy arrays."""
        return {key: float32_arrays(_split(fields)[1]) for key, fields in blocks.items()
                if _split(fields)[1] is not None}

    @staticmethod
    def factor_sums(blocks):
        """``{block key: (A', G')}``, A' = V_A' diag(λ_A') V_A'ᵀ (float64 tensors) of the
        online blocks that keep their eigenvalues."""
        return {key: tuple(factor(v, lam) for v, lam in zip(fields[:2], _split(fields)[1]))
                for key, fields in blocks.items() if _split(fields)[1] is not None}

    @staticmethod
    def check_options(mode, kfac_sum):
        if kfac_sum != "exact":
            raise ValueError(
                "`kfac_sum` applies to curvature='kfac' only: curvature='ekfac' keeps one term per "
                "block in mode='online', in the eigenbasis of the decayed factor sums. Received: "
                f"kfac_sum={kfac_sum!r} with curvature='ekfac'. Leave kfac_sum='exact'.")

    # The task.
    @staticmethod
    def check_result(result, source, tracking):
        if not isinstance(result, EKFACFisher):
            raise TypeError(
                "`fisher` must be a fastewc.blocks.ekfac.EKFACFisher (a curvature='ekfac' "
                "Fisher's result) for an EWC with curvature='ekfac'. Received: fisher of type "
                f"{type(result).__name__}")
        Kronecker.check_result(result, source, tracking)

    @staticmethod
    def estimate(result, source, tracking):
        """``{block key: (layer name, U_A, U_G, S, input_rank, λ_A, λ_G)}`` of the blocks this EWC
        penalizes (as :meth:`Kronecker.estimate`: all or none of a block's variables)."""
        blocks = {}
        for block in result.blocks:
            excluded = [tracking.exclude(v) for v in block.variables]
            if all(excluded):
                continue
            if any(excluded):
                raise ValueError(
                    f"`exclude` covers part of layer '{block.layer}''s EKFAC block "
                    f"{[v.path for v in block.variables]}: exclude all of its variables or none.")
            keys = tuple(tracking.key(v) for v in block.variables)
            blocks[keys if len(keys) == 2 else keys + (None,)] = (
                block.layer, block.u_a, block.u_g, block.s, block.input_rank, block.lam_a, block.lam_g)
        return blocks

    @staticmethod
    def merge(current, task, settings, tracking):
        """Every changed block's fields (nothing assigned; module docstring): a task's block
        gets its term (U_A, U_G, S, W̄_t) appended (separate mode) or becomes the one term in
        the eigenbasis of the decayed factor sums, with their eigenvalues after it (online,
        :func:`online_term`); in online mode a block the task does not estimate gets γ S
        (γ λ_A', γ λ_G') and the task's weights.  Raises for S negative or not finite, bases
        not finite, eigenvalues negative, not finite or not one per basis column, an online
        task without eigenvalues, or a result float32 cannot hold, naming the layer."""
        online, gamma = settings.mode == "online", settings.gamma
        pending = {}

        def anchor_of(block, input_rank):
            return kronecker.weight_matrix([task.theta[k] if k in task.theta else
                                            penalty_lib.read_float32(task.by_key[k])
                                            for k in block if k is not None], input_rank)

        for block, (layer, u_a, u_g, s, input_rank, lam_a, lam_g) in task.estimates.get(EKFAC.kind, {}).items():
            u_a, u_g, s = (tf.cast(x, tf.float32) for x in (u_a, u_g, s))
            if not (all_finite([u_a, u_g, s]) and bool(tf.reduce_all(s >= 0))):
                raise ValueError(
                    f"`fisher`: the EKFAC block of layer '{layer}' must have finite bases and "
                    "finite second moments S >= 0. Received: NaN, Inf or a negative S")
            if online and (lam_a is None or lam_g is None):
                raise ValueError(
                    f"`fisher`: mode='online' needs the factors' eigenvalues of the EKFAC block of "
                    f"layer '{layer}' (EKFACBlock's lam_a and lam_g: the eigenbasis of the decayed "
                    "factor sums holds the state). Received: lam_a=None or lam_g=None. Pass the "
                    "estimator's result, or give EKFACBlock its lam_a and lam_g.")
            values = None if lam_a is None else (tf.cast(lam_a, tf.float32), tf.cast(lam_g, tf.float32))
            if values is not None and not (
                    all_finite(values) and all(tuple(lam.shape) == tuple(u.shape[1:]) and bool(tf.reduce_all(
                        lam >= 0)) for lam, u in zip(values, (u_a, u_g)))):
                raise ValueError(
                    f"`fisher`: the factors' eigenvalues lam_a, lam_g of the EKFAC block of layer "
                    f"'{layer}' must be finite, >= 0 and one per column of u_a, u_g. Received: lam_a "
                    f"{tuple(values[0].shape)}, lam_g {tuple(values[1].shape)}, u_a {tuple(u_a.shape)}, "
                    f"u_g {tuple(u_g.shape)} (or NaN, Inf, a negative eigenvalue)")
            anchor = anchor_of(block, input_rank)
            if not all_finite([anchor]):
                raise ValueError(f"`anchors`: the weights of layer '{layer}' must be finite. "
                                 "Received: NaN or Inf")
            if not online:
                pending[block] = list(current.get(block, [])) + [u_a, u_g, s, anchor]
                continue
            v_a, v_g, s, lam_a, lam_g = online_term(current.get(block, []), (u_a, u_g, s) + values, gamma)
            pending[block] = [v_a, v_g, s, anchor, lam_a, lam_g]
        for block, fields in current.items() if online else ():
            if block not in pending:
                terms, values = _split(fields)
                input_rank = stored_input_rank(task.by_key[block[0]], block, fields[3])
                pending[block] = [v for u_a, u_g, s, _ in terms
                                  for v in (u_a, u_g, gamma * s, anchor_of(block, input_rank))]
                pending[block] += [gamma * lam for lam in values or ()]
        for block, fields in pending.items() if online else ():     # separate: checked above
            if not all_finite(fields):
                raise ValueError(
                    f"`fisher`: adding this task would make the EKFAC terms of '{block[0]}' not "
                    "finite in float32 (the weights, S or the eigenvalues are too large). The state is "
                    "unchanged.")
        return pending, 0.0

    @staticmethod
    def penalty(thetas, fields, lam, damping):
        """``(λ/2 Σ_t Σ (S_t + δ) ⊙ M_t², [∇ per theta])``, M_t = U_A,tᵀ (W̄ − W̄_t) U_G,t,
        δ the damping (Tikhonov: F_t + δ I)."""
        input_rank = kronecker.input_rank_of(thetas[0].shape, fields[3].shape[0] - len(thetas) + 1)
        w = kronecker.weight_matrix(thetas, input_rank)
        value, grad = tf.constant(0.0), tf.zeros_like(w)
        for u_a, u_g, s, anchor in _split(fields)[0]:       # the eigenvalues are the merge's
            m = tf.matmul(tf.matmul(u_a, w - anchor, transpose_a=True), u_g)
            weighted = (s + damping) * m
            value += tf.reduce_sum(weighted * m)
            grad += tf.matmul(tf.matmul(u_a, weighted), u_g, transpose_b=True)
        return (0.5 * lam) * value, kronecker.split_matrix(lam * grad, [tuple(t.shape) for t in thetas],
                                                           input_rank)

    @staticmethod
    def explain(thetas, fields, lam):
        return (f"the EKFAC penalty of {EKFAC.num_terms(fields)} term(s) is not finite in float32 (the "
                f"distance to the anchors or S too large for lam={float(lam):.4g})")

    # Checkpoint.
    @staticmethod
    def from_checkpoint(tables, tracking, current):
        """``{block: fields}`` of a checkpoint's EKFAC term fields: every term complete,
        numbered from 0, shaped from the model's kernel."""
        blocks = terms_from_checkpoint(tables.get("ekfac_terms", {}), tracking, label="EKFAC",
                                       fields=FIELDS, shapes_of=_shapes)
        grouped = {}
        for key, value in tables.get("ekfac_eigenvalues", {}).items():
            parts = key.split("|")
            if len(parts) != 3 or parts[2] not in EIGENVALUES:
                raise ValueError(f"Cannot restore EWC EKFAC state '{key}' from the checkpoint: not an "
                                 "EKFAC eigenvalues key.")
            grouped.setdefault((parts[0], parts[1] or None), {})[parts[2]] = value
        for block, values in grouped.items():
            blocks[block] = _with_eigenvalues(blocks.get(block, []), [values.get(f) for f in EIGENVALUES],
                                              f"Cannot restore the EWC EKFAC state of '{block[0]}' from the "
                                              "checkpoint")
        return blocks

    # File.
    @staticmethod
    def to_file(blocks):
        """``{block: ([(U_A, U_G, S, W̄*)], (λ_A', λ_G') or None)}``."""
        values = EKFAC.eigenvalues(blocks)
        return {key: (terms, values.get(key)) for key, terms in EKFAC.snapshot(blocks).items()}

    @staticmethod
    def from_file(section, tracking, path):
        """``{block: fields}`` of a file's ``ekfac`` section, each block checked against the
        model (its variables exist, the terms' shapes follow its kernel)."""
        blocks = terms_from_file({block: terms for block, (terms, _) in section.items()}, tracking, path,
                                 label="EKFAC", shapes_of=_shapes)
        for block, (_, values) in section.items():
            if values is not None:
                blocks[block] = _with_eigenvalues(blocks[block], values, f"Cannot load EWC state from "
                                                  f"{path!r} onto model '{tracking.model.name}': the EKFAC "
                                                  f"state of '{block[0]}'")
        return blocks

    @staticmethod
    def file_arrays(section):
        """``(header fields, arrays)`` of ``{block: ([(U_A, U_G, S, W̄*)], (λ_A', λ_G') or
        None)}`` (the i-th block's eigenvalues: ``"eigenvalues": true`` and ``ekfla_i``,
        ``ekflg_i``; version 3, :meth:`file_version`)."""
        entries, arrays, j = [], {}, 0
        for i, ((kernel, bias), (block_terms, values)) in enumerate(section.items()):
            rows, units = (np.shape(block_terms[0][3]) if block_terms else (0, 0))
            entries.append({"kernel": kernel, "bias": bias, "rows": int(rows), "units": int(units),
                            "terms": len(block_terms)})
            if values is not None:
                entries[-1]["eigenvalues"] = True
                for name, value in zip(_EIGENVALUE_ARRAYS, values):
                    arrays[f"{name}_{i}"] = np.asarray(value, np.float32)
            for term in block_terms:
                for name, value in zip(_ARRAYS, term):
                    arrays[f"{name}_{j}"] = np.asarray(value, np.float32)
                j += 1
        return {"ekfac": entries}, arrays

    @staticmethod
    def file_shapes(header):
        """``{array name: shape}`` of the terms the header lists; ValueError(reason) if malformed."""
        shapes, j = {}, 0
        try:
            for i, block in enumerate(header.get("ekfac", [])):
                rows, units = int(block["rows"]), int(block["units"])
                if block.get("eigenvalues", True) is not True:
                    raise ValueError(f"'eigenvalues' must be true or absent, not {block['eigenvalues']!r}")
                if "eigenvalues" in block:
                    if header["version"] < EKFAC.EIGENVALUES_FILE_VERSION:
                        raise ValueError(f"'eigenvalues' needs file version {EKFAC.EIGENVALUES_FILE_VERSION}, "
                                         f"the header says {header['version']}")
                    shapes.update({f"ekfla_{i}": (rows,), f"ekflg_{i}": (units,)})
                for _ in range(int(block["terms"])):
                    shapes.update({f"ekfua_{j}": (rows, rows), f"ekfug_{j}": (units, units),
                                   f"ekfs_{j}": (rows, units), f"ekfw_{j}": (rows, units)})
                    j += 1
        except Exception as err:     # noqa: BLE001
            raise ValueError(f"bad EKFAC block list ({type(err).__name__}: {err})") from None
        return shapes

    @staticmethod
    def read_file_arrays(header, arrays):
        section, j = {}, 0
        for i, block in enumerate(header.get("ekfac", [])):
            block_terms = []
            for _ in range(int(block["terms"])):
                block_terms.append(tuple(arrays[f"{name}_{j}"] for name in _ARRAYS))
                j += 1
            values = (tuple(arrays[f"{name}_{i}"] for name in _EIGENVALUE_ARRAYS) if "eigenvalues" in block
                      else None)
            section[(str(block["kernel"]), None if block["bias"] is None else str(block["bias"]))] = (
                block_terms, values)
        return section
