"""curvature="ekfac" (fastewc/blocks/ekfac.py) against a float64 NumPy oracle on a tiny
Dense MLP (one position per example): per-example gradients by a loop (manual backprop),
A = (1/N) Σ ā āᵀ, G = (1/N) Σ δ δᵀ (empirical: the true label), their eigenbases, the
EKFAC second moments S_ij = (1/N) Σ_n (U_Aᵀ ḡ_n U_G)_ij² (the estimator's, from its two
passes: against per-example float64 gradients of a float64 twin, in the bases it
returns, which must diagonalize fastewc.testing's float64 factors), and the penalty

    P = λ/2 Σ_t Σ_ij (S_t)_ij (U_A,tᵀ (W̄ − W̄_t) U_G,t)_ij²  (+ the diagonal rest)

with its gradient, formed explicitly as vec(ΔW̄)ᵀ (U_A ⊗ U_G) diag(vec S) (U_A ⊗ U_G)ᵀ vec(ΔW̄)
(np.kron, row-major vec, the bias as W̄'s last row); then a save/load and a checkpoint
round trip.  Then the state half's online mode and damping against float64 references.
"""
import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import fastewc
from fastewc.blocks.ekfac import EKFAC, EKFACBlock, EKFACFisher, second_moments
from fastewc.testing import float64_twin, reference_fisher_of, reference_kronecker_factors

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
LAM, DAMPING = 2.0, 0.0


def mlp():
    keras.utils.set_random_seed(3)
    return keras.Sequential([keras.Input((5,)), keras.layers.Dense(4, activation="tanh", name="d1"),
                             keras.layers.Dense(3, name="d2")])


def data(seed, n=7):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 5)).astype(np.float32), rng.integers(0, 3, size=n)


def per_example64(model, x, y):
    """``{layer: (rows ā (N, d'), deltas δ (N, u))}`` in float64, one example at a time."""
    (w1, b1), (w2, b2) = [[np.float64(v.numpy()) for v in layer.weights] for layer in model.layers]
    out = {"d1": ([], []), "d2": ([], [])}
    for xn, yn in zip(np.float64(x), y):
        h = np.tanh(xn @ w1 + b1)
        z = h @ w2 + b2
        p = np.exp(z - z.max())
        p /= p.sum()
        d2 = p - np.eye(3)[yn]                        # ∂CE/∂z
        d1 = (w2 @ d2) * (1 - h ** 2)
        for name, a, d in (("d1", xn, d1), ("d2", h, d2)):
            out[name][0].append(np.append(a, 1.0))
            out[name][1].append(d)
    return {k: (np.array(a), np.array(d)) for k, (a, d) in out.items()}


def oracle_blocks(model, x, y):
    """``{layer: (A, G, U_A, U_G, S_baseline, S_true)}``, float64."""
    blocks = {}
    for name, (rows, deltas) in per_example64(model, x, y).items():
        n = len(rows)
        a, g = rows.T @ rows / n, deltas.T @ deltas / n
        (la, ua), (lg, ug) = np.linalg.eigh(a), np.linalg.eigh(g)
        grads = [np.outer(r, d) for r, d in zip(rows, deltas)]          # ḡ_n = ā_n δ_nᵀ
        s = sum((ua.T @ gn @ ug) ** 2 for gn in grads) / n
        blocks[name] = (a, g, ua, ug, np.outer(np.maximum(la, 0), np.maximum(lg, 0)), s)
    return blocks


def matrix(layer):
    kernel, bias = [np.float64(v.numpy()) for v in layer.weights]
    return np.vstack([kernel, bias[None]])


def penalty64(model, terms, lam=LAM, damping=DAMPING):
    """Value and per-layer W̄ gradient with every Kronecker product formed explicitly;
    ``terms`` {layer: [(U_A, U_G, S, W̄*)]}."""
    value, grads = 0.0, {}
    for name, layer_terms in terms.items():
        w = matrix(model.get_layer(name))
        grads[name] = np.zeros_like(w)
        for ua, ug, s, anchor in layer_terms:
            u = np.kron(np.float64(ua), np.float64(ug))
            f = u @ np.diag(np.float64(s).ravel() + damping) @ u.T
            dw = (w - anchor).ravel()
            value += 0.5 * lam * dw @ f @ dw
            grads[name] += (lam * f @ dw).reshape(w.shape)
    return value, grads


def same_basis(u, reference, eigenvalues):
    """Eigenvectors equal up to sign (the oracle's and TF's eigh may flip columns) where the
    eigenvalues are distinct; S is compared where it is basis-independent."""
    for j in range(u.shape[1]):
        gaps = np.abs(eigenvalues - eigenvalues[j])
        gaps[j] = np.inf
        if gaps.min() > 1e-4 * max(1.0, abs(eigenvalues).max()):
            sign = np.sign(u[:, j] @ reference[:, j])
            np.testing.assert_allclose(sign * u[:, j], reference[:, j], atol=2e-4)


def per_example_gradients64(twin, x, y, kind):
    """``{layer name: [(weight, ḡ)]}``: each example's float64 gradient of −log q(y | x_n)
    w.r.t. the layer's W̄ (kernel rows, bias last), for the true label (empirical) or every
    class y with weight q(y | x_n) (exact), over N examples; one tape per example on a
    float64 twin of the model (``twin``: fastewc.testing.float64_twin), nothing from the fast path."""
    layers = [layer for layer in twin.layers if isinstance(layer, keras.layers.Dense)]
    out = {layer.name: [] for layer in layers}
    for n in range(len(x)):
        with tf.GradientTape(persistent=True) as tape:
            logp = tf.nn.log_softmax(twin(np.float64(x[n:n + 1])))[0]
            nll = [-logp[c] for c in range(3)]
        outcomes = [(1.0, int(y[n]))] if kind == "empirical" else list(zip(np.exp(logp.numpy()), range(3)))
        for w, label in outcomes:
            for layer in layers:
                kernel, bias = tape.gradient(nll[label], [layer.kernel, layer.bias])
                out[layer.name].append((w, np.vstack([kernel.numpy(), bias.numpy()[None]])))
    return out, len(x)


def oracle_s(grads, n, u_a, u_g):
    """S = (1/N) Σ_n Σ_y w (U_Aᵀ ḡ U_G)² in the bases given (float64)."""
    u_a, u_g = np.float64(u_a), np.float64(u_g)
    return sum(w * (u_a.T @ g @ u_g) ** 2 for w, g in grads) / n


@pytest.mark.parametrize("kind", ["empirical", "exact"])
def test_estimator_gives_eigenbases_and_corrected_second_moments(kind):
    """Two passes: the bases diagonalize the float64 factors A, G and S is the second
    moment of the per-example gradients in them, not the Kronecker eigenvalues λ_A λ_Gᵀ; the
    approximation U diag(S) Uᵀ matches the oracle's own (its eigh bases, its S).  Three
    rows a call (padding rows in the last batch); a second call on other data reuses the
    traces and gives that data's S."""
    model = mlp()
    twin = float64_twin(model)
    estimator = fastewc.FisherEstimator(model, loss=LOSS, kind=kind, curvature="ekfac", batch_size=3,
                                        jit_compile=False)
    x, y = data(0)
    estimator(data(1))
    traces = estimator.tracing_count()
    result = estimator((x, y))
    assert estimator.tracing_count() == traces
    assert isinstance(result, EKFACFisher) and [b.layer for b in result.blocks] == ["d1", "d2"]
    assert all(d is None for d in result.diagonal)
    factors = reference_kronecker_factors(twin, x, y, loss=LOSS, kind=kind)
    grads, n = per_example_gradients64(twin, x, y, kind)
    for block in result.blocks:
        a, g = factors[block.layer]
        u_a, u_g = np.float64(block.u_a), np.float64(block.u_g)
        for lam, f in ((block.lam_a, a), (block.lam_g, g)):     # the eigenvalues it carries (vectors)
            np.testing.assert_allclose(lam, np.linalg.eigvalsh(f), atol=1e-6 * np.abs(f).max())
        np.testing.assert_allclose(u_a.T @ u_a, np.eye(len(a)), atol=1e-5)
        np.testing.assert_allclose(u_a.T @ a @ u_a, np.diag(np.linalg.eigvalsh(a)), atol=1e-5)
        np.testing.assert_allclose(u_g.T @ g @ u_g, np.diag(np.linalg.eigvalsh(g)), atol=1e-5)
        s = oracle_s(grads[block.layer], n, u_a, u_g)
        np.testing.assert_allclose(block.s, s, rtol=1e-4, atol=1e-7 * s.max())
        baseline = np.outer(np.linalg.eigvalsh(a), np.linalg.eigvalsh(g))
        assert np.abs(s - baseline).max() > 0.05 * s.max()        # the correction is not KFAC's
        (_, ua), (_, ug) = np.linalg.eigh(a), np.linalg.eigh(g)
        want = np.kron(ua, ug) @ np.diag(oracle_s(grads[block.layer], n, ua, ug).ravel()) @ np.kron(ua, ug).T
        u = np.kron(u_a, u_g)
        np.testing.assert_allclose(u @ np.diag(np.float64(block.s).ravel()) @ u.T, want,
                                   atol=1e-4 * np.abs(want).max())


def test_positions_form_the_per_example_gradient_before_squaring():
    """A Dense over 2 positions: ḡ_n = Σ_l ā_nl δ_nlᵀ is summed over the positions before it
    is projected and squared (the per-example path of the second pass)."""
    keras.utils.set_random_seed(5)
    model = keras.Sequential([keras.Input((2, 5)), keras.layers.Dense(4, activation="tanh", name="d1"),
                              keras.layers.Flatten(), keras.layers.Dense(3, name="d2")])
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(6, 2, 5)).astype(np.float32), rng.integers(0, 3, size=6)
    result = fastewc.FisherEstimator(model, loss=LOSS, kind="empirical", curvature="ekfac",
                                     jit_compile=False)((x, y))
    grads, n = per_example_gradients64(float64_twin(model), x, y, "empirical")
    for block in result.blocks:
        s = oracle_s(grads[block.layer], n, block.u_a, block.u_g)
        np.testing.assert_allclose(block.s, s, rtol=1e-4, atol=1e-7 * s.max())


def oracle_fisher(model, x, y):
    """An EKFACFisher with the oracle's bases and true S (the EKFAC correction)."""
    oracle = oracle_blocks(model, x, y)
    blocks = [EKFACBlock(name, tuple(model.get_layer(name).weights),
                         *(tf.constant(v, tf.float32) for v in (oracle[name][2], oracle[name][3], oracle[name][5])))
              for name in ("d1", "d2")]
    return EKFACFisher(blocks, [None] * 4, list(model.trainable_variables)), oracle


def test_penalty_and_gradient_two_tasks_against_explicit_kron(tmp_path):
    model = mlp()
    ewc = fastewc.EWC(model, lam=LAM, curvature="ekfac")
    terms = {"d1": [], "d2": []}
    rng = np.random.default_rng(9)
    for t in range(2):
        x, y = data(10 + t)
        fisher, oracle = oracle_fisher(model, x, y)
        ewc.add_task(fisher)
        for name in terms:
            terms[name].append(oracle[name][2:4] + (oracle[name][5], matrix(model.get_layer(name))))
        for v in model.trainable_variables:       # move away from the task's weights
            v.assign(v + rng.normal(scale=0.3, size=v.shape).astype(np.float32))
    want, want_grads = penalty64(model, terms)
    value, grads = ewc.penalty_and_gradients()
    np.testing.assert_allclose(float(value), want, rtol=1e-4)
    for i, name in enumerate(("d1", "d2")):
        np.testing.assert_allclose(grads[2 * i], want_grads[name][:-1], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(grads[2 * i + 1], want_grads[name][-1], rtol=1e-4, atol=1e-5)

    path = tmp_path / "ekfac.npz"
    ewc.save(path)
    loaded = fastewc.EWC.load(path, model)
    assert loaded.curvature == "ekfac"
    np.testing.assert_allclose(float(loaded.penalty()), want, rtol=1e-4)

    checkpoint = tf.train.Checkpoint(ewc=ewc)
    saved = checkpoint.write(str(tmp_path / "ckpt"))
    fresh = fastewc.EWC(model, lam=LAM, curvature="ekfac")
    tf.train.Checkpoint(ewc=fresh).read(saved).assert_consumed()
    np.testing.assert_allclose(float(fresh.penalty()), want, rtol=1e-4)


def test_consolidate_runs_the_estimator():
    model = mlp()
    x, y = data(4)
    ewc = fastewc.EWC(model, lam=LAM, curvature="ekfac")
    fisher = ewc.consolidate((x, y), loss=LOSS, kind="empirical", jit_compile=False)
    assert isinstance(fisher, EKFACFisher)
    assert float(ewc.penalty()) == 0.0                       # at the anchors
    with pytest.raises(TypeError, match="EKFACFisher"):
        ewc.add_task(fastewc.kfac_fisher(model, (x, y), loss=LOSS, kind="empirical"))


def test_second_moments_and_bad_estimates():
    model = mlp()
    x, y = data(6)
    oracle = oracle_blocks(model, x, y)
    rows, deltas = per_example64(model, x, y)["d2"]
    per_example = np.einsum("na,nb->nab", rows, deltas)
    s = second_moments(per_example, oracle["d2"][2], oracle["d2"][3])
    np.testing.assert_allclose(s, oracle["d2"][5], rtol=1e-10, atol=1e-14)   # G has a null direction

    ewc = fastewc.EWC(model, lam=LAM, curvature="ekfac")
    fisher, _ = oracle_fisher(model, x, y)
    bad = fisher._replace(blocks=[fisher.blocks[0], fisher.blocks[1]._replace(s=-fisher.blocks[1].s)])
    with pytest.raises(ValueError, match="S >= 0"):
        ewc.add_task(bad)
    assert ewc.num_tasks == 0
    ewc.add_task(fisher)                      # the valid task still goes in
    assert ewc.num_tasks == 1


def test_a_rule_without_per_example_rows_is_refused_naming_the_layer():
    """The second pass needs the rule's per-example rows: a ``kron`` that gives none (a
    custom rule's) raises, naming the layer and the fix, and nothing is returned."""
    from fastewc.rules.dense import dense_rule

    def rule(layer, inputs, **kwargs):
        out = dense_rule(layer, inputs, **kwargs)
        return out._replace(kron=lambda d, w, m: [s._replace(rows=None, deltas=None) for s in out.kron(d, w, m)])

    model = mlp()
    rules = fastewc.default_rules().with_rule(keras.layers.Dense, rule)
    estimator = fastewc.FisherEstimator(model, loss=LOSS, kind="empirical", curvature="ekfac", rules=rules,
                                        jit_compile=False)
    with pytest.raises(ValueError, match=r"curvature='ekfac' needs the per-example rows of layer 'd1': its "
                                         r"rule's KroneckerSums has rows=None. Use curvature='kfac' for it."):
        estimator(data(0))


def test_an_embedding_table_keeps_its_diagonal():
    """An Embedding's Kronecker block has a diagonal A (token counts); EKFAC gives the
    table its diagonal Fisher instead (float64 reference), and the Dense layer a block."""
    keras.utils.set_random_seed(7)
    model = keras.Sequential([keras.Input((3,), dtype="int32"), keras.layers.Embedding(6, 2, name="emb"),
                              keras.layers.Flatten(), keras.layers.Dense(3, name="d2")])
    rng = np.random.default_rng(4)
    x, y = rng.integers(0, 6, size=(5, 3)).astype(np.int32), rng.integers(0, 3, size=5)
    result = fastewc.FisherEstimator(model, loss=LOSS, kind="empirical", curvature="ekfac",
                                     jit_compile=False)((x, y))
    assert [b.layer for b in result.blocks] == ["d2"]
    want = reference_fisher_of(model, x, y, loss=LOSS, kind="empirical")
    np.testing.assert_allclose(result.diagonal[0], want[0], rtol=1e-4, atol=1e-7)


def test_a_shared_layer_is_refused_with_the_kinds_reason():
    """A layer called twice per forward pass: the shared-layer error with EKFAC's own
    reason and the advice to use the diagonal."""
    keras.utils.set_random_seed(3)
    inp = keras.Input((5,))
    shared = keras.layers.Dense(5, activation="tanh", name="shared")
    model = keras.Model(inp, keras.layers.Dense(3, name="out")(shared(shared(inp))))
    with pytest.raises(ValueError, match=r"Layer 'shared' \(Dense\) is called more than once in one forward "
                                         r"pass \(a shared layer\)\. curvature='ekfac' cannot take a shared "
                                         r"layer: its Fisher block is not one Kronecker eigenbasis\. Use "
                                         r"curvature='diagonal'"):
        fastewc.FisherEstimator(model, loss=LOSS, curvature="ekfac")(data(0))


def test_the_second_pass_shows_its_own_progress(capsys):
    """``verbose`` covers both passes: the first pass's line and bar, then the second's."""
    model = mlp()
    x, y = data(5, n=8)
    estimator = fastewc.FisherEstimator(model, loss=LOSS, kind="empirical", curvature="ekfac",
                                        batch_size=4, jit_compile=False)
    estimator((x, y), verbose=1)
    out = capsys.readouterr().out
    first = out.index("fastewc.fisher_diagonal: kind='empirical'")
    second = out.index("fastewc.fisher_diagonal: second pass of curvature='ekfac'")
    assert first < second
    assert "2/2" in out[first:second] and "2/2" in out[second:]


# -- online mode and damping (the state half) ---------------------------------------------------
# The float64 references below form the projection from its definition, diag(Uᵀ F' U) with
# U = U_A ⊗ U_G (np.kron), not from the closed form (P_A ⊙ P_A) S' (P_G ⊙ P_G)ᵀ the code uses.
KEYS = {"d1": ("d1/kernel", "d1/bias"), "d2": ("d2/kernel", "d2/bias")}
LANDED = os.path.join(os.path.dirname(__file__), "data", "landed_ekfac")


def orthogonal(rng, n):
    return np.linalg.qr(rng.normal(size=(n, n)))[0]


def project64(s_old, ua_old, ug_old, ua, ug):
    """The diagonal of Uᵀ F' U in the basis U = U_A ⊗ U_G, F' = U' diag(vec S') U'ᵀ (float64)."""
    u, u_old = np.kron(ua, ug), np.kron(ua_old, ug_old)
    f_old = u_old @ np.diag(np.ravel(s_old)) @ u_old.T
    return np.diag(u.T @ f_old @ u).reshape(np.shape(s_old))


def random_eigenvalues(rng, n):
    """λ spread over [0.5, 3] in a random order (distinct eigenvalues, well apart)."""
    return rng.permutation(np.linspace(0.5, 3.0, n) * rng.uniform(0.9, 1.1, n))


def random_fisher(model, rng, names=("d1", "d2"), factors=True):
    """An EKFACFisher of random orthogonal bases, S >= 0 and (``factors``) the eigenvalues of
    factors with those eigenbases (float32) for ``names``, and ``{name: (U_A, U_G, S, A, G)}``
    (float64 of those float32 values, A = U_A diag(λ_A) U_Aᵀ; A, G None without ``factors``)."""
    blocks, values = [], {}
    for name in names:
        layer = model.get_layer(name)
        rows, units = layer.kernel.shape[0] + 1, layer.kernel.shape[1]
        ua, ug, s, lam_a, lam_g = (np.float32(m) for m in (
            orthogonal(rng, rows), orthogonal(rng, units), rng.uniform(0, 2, (rows, units)),
            random_eigenvalues(rng, rows), random_eigenvalues(rng, units)))
        if not factors:
            lam_a = lam_g = None
        a, g = ((None, None) if lam_a is None else
                ((np.float64(u) * np.float64(lam)) @ np.float64(u).T for u, lam in ((ua, lam_a), (ug, lam_g))))
        values[name] = tuple(np.float64(m) for m in (ua, ug, s)) + (a, g)
        blocks.append(EKFACBlock(name, (layer.kernel, layer.bias), tf.constant(ua), tf.constant(ug), tf.constant(s),
                                 lam_a=None if lam_a is None else tf.constant(lam_a),
                                 lam_g=None if lam_g is None else tf.constant(lam_g)))
    variables = list(model.trainable_variables)
    return EKFACFisher(blocks, [None] * len(variables), variables), values


def ekfac_state(ewc):
    """``{layer: [(U_A, U_G, S, W̄*)]}`` of the EWC's EKFAC blocks (float64 copies)."""
    state = EKFAC.snapshot(ewc._state.variables(EKFAC))
    return {name: [tuple(np.float64(m) for m in term) for term in state[keys]]
            for name, keys in KEYS.items() if keys in state}


def assert_state(ewc, want, rtol=1e-5):
    got = ekfac_state(ewc)
    assert sorted(got) == sorted(want)
    for name, terms in want.items():
        assert len(got[name]) == len(terms)
        for got_term, want_term in zip(got[name], terms):
            for g, w in zip(got_term, want_term):
                np.testing.assert_allclose(g, w, rtol=rtol, atol=rtol * np.abs(w).max())


def merge64(old, task, gamma):
    """The online merge from its definition (float64): ``old`` None or (V_A', V_G', S', λ_A',
    λ_G'), ``task`` (U_A, U_G, S_t, A_t, G_t) → (V_A, V_G, S, λ_A, λ_G): the eigenpairs of
    A_sum = γ A' + A_t, G_sum = γ G' + G_t with A' = V_A' diag(λ_A') V_A'ᵀ (G' alike), and
    S = diag(Vᵀ (γ F' + F_t) V) with F' and F_t the EKFAC approximations formed with np.kron
    (project64: the closest diagonal in V).  With no ``old``: the task's basis and
    λ = diag(U_Aᵀ A_t U_A), the eigenvalues paired with U's columns."""
    ua, ug, s, a, g = task
    if old is None:
        return ua, ug, s, np.diag(ua.T @ a @ ua), np.diag(ug.T @ g @ ug)
    a_sum, g_sum = (gamma * (v * lam) @ v.T + f for v, lam, f in ((old[0], old[3], a), (old[1], old[4], g)))
    (lam_a, va), (lam_g, vg) = np.linalg.eigh(a_sum), np.linalg.eigh(g_sum)
    return va, vg, gamma * project64(old[2], old[0], old[1], va, vg) + project64(s, ua, ug, va, vg), lam_a, lam_g


def online_state(ewc):
    """``{layer: (V_A, V_G, S, W̄*, λ_A, λ_G)}`` of an online EWC (float64 copies)."""
    factors = EKFAC.eigenvalues(ewc._state.variables(EKFAC))
    return {name: terms[0] + tuple(np.float64(f) for f in factors[KEYS[name]])
            for name, terms in ekfac_state(ewc).items() if len(terms) == 1}


def assert_online(ewc, want, rtol=1e-5):
    """The online state against ``want`` ``{layer: (V_A, V_G, S, W̄*, λ_A, λ_G)}``: the bases
    up to the signs of their columns (eigenvectors), the rest entry by entry."""
    got = online_state(ewc)
    assert sorted(got) == sorted(want)
    for name, fields in want.items():
        for i, (g, w) in enumerate(zip(got[name], fields)):
            if i < 2:
                g = g * np.sign(np.sum(g * w, axis=0))
            np.testing.assert_allclose(g, w, rtol=rtol, atol=rtol * np.abs(w).max())


def as_terms(state):
    """``{layer: [(V_A, V_G, S, W̄*)]}`` of an online state (for penalty64)."""
    return {name: [fields[:4]] for name, fields in state.items()}


def move(model, rng, scale=0.3):
    for v in model.trainable_variables:
        v.assign(v + rng.normal(scale=scale, size=v.shape).astype(np.float32))


def assert_penalty(ewc, model, want_terms, damping, rtol=1e-4):
    want, want_grads = penalty64(model, want_terms, damping=damping)
    value, grads = ewc.penalty_and_gradients()
    np.testing.assert_allclose(float(value), want, rtol=rtol)
    for i, name in enumerate(("d1", "d2")):
        np.testing.assert_allclose(grads[2 * i], want_grads[name][:-1], rtol=rtol, atol=1e-5)
        np.testing.assert_allclose(grads[2 * i + 1], want_grads[name][-1], rtol=rtol, atol=1e-5)


def test_the_projection_is_the_closest_diagonal_in_the_new_basis_and_keeps_the_trace():
    """S_proj against diag(Uᵀ F' U) formed with np.kron; its sum is S''s (P ⊙ P doubly
    stochastic), it is >= 0, no other diagonal in the new basis is closer to F', and bases
    equal up to signs and a permutation give S' permuted."""
    from fastewc.blocks.ekfac import project
    rng = np.random.default_rng(1)
    ua_old, ug_old, ua, ug = orthogonal(rng, 4), orthogonal(rng, 3), orthogonal(rng, 4), orthogonal(rng, 3)
    s_old = rng.uniform(0, 2, (4, 3))
    got = project(s_old, ua_old, ug_old, ua, ug).numpy()
    np.testing.assert_allclose(got, project64(s_old, ua_old, ug_old, ua, ug), rtol=1e-12)
    np.testing.assert_allclose(got.sum(), s_old.sum(), rtol=1e-13)
    assert (got >= 0).all()
    u, u_old = np.kron(ua, ug), np.kron(ua_old, ug_old)
    f_old = u_old @ np.diag(s_old.ravel()) @ u_old.T
    best = np.linalg.norm(u @ np.diag(got.ravel()) @ u.T - f_old)
    for _ in range(5):
        other = got + rng.normal(scale=0.1, size=got.shape)
        assert np.linalg.norm(u @ np.diag(other.ravel()) @ u.T - f_old) > best
    perm_a, perm_g = rng.permutation(4), rng.permutation(3)
    flipped = project(s_old, ua_old, ug_old, -ua_old[:, perm_a], ug_old[:, perm_g] * [1, -1, 1]).numpy()
    np.testing.assert_allclose(flipped, s_old[perm_a][:, perm_g], rtol=1e-12)


def test_online_merge_holds_both_terms_in_the_basis_of_the_decayed_factor_sums():
    """Three online tasks with γ < 1: one term per block in the eigenbasis V of
    A_sum = γ A' + A_t, G_sum = γ G' + G_t, S = γ proj(S') + proj(S_t), and A_sum's
    eigenvalues (vectors: the state holds no d'² factor), against merge64 (the float64
    definition, A' = V' diag(λ') V'ᵀ: the state's float32 V, λ rebuild it up to rounding,
    hence rtol 1e-5 on eigenpairs of well-separated eigenvalues); the sum of S is γ × the
    previous one's + S_t's (both projections keep the trace); the penalty and its gradient
    against float64; then a task that does not estimate d1 (frozen) decays its S and
    eigenvalues by γ and moves its anchor."""
    model, rng, gamma = mlp(), np.random.default_rng(2), 0.6
    ewc = fastewc.EWC(model, lam=LAM, curvature="ekfac", mode="online", gamma=gamma)
    want = {}
    for t in range(3):
        fisher, values = random_fisher(model, rng)
        previous = {name: fields[2].sum() for name, fields in online_state(ewc).items()}
        ewc.add_task(fisher)
        for name, task in values.items():
            old = want.get(name)
            merged = merge64(None if old is None else old[:3] + old[4:], task, gamma)
            want[name] = merged[:3] + (matrix(model.get_layer(name)),) + merged[3:]
        assert_online(ewc, want)
        for name, total in previous.items():
            np.testing.assert_allclose(online_state(ewc)[name][2].sum(), gamma * total + values[name][2].sum(),
                                       rtol=1e-6)
        move(model, rng)
    assert ewc.num_tasks == 3 and ewc.structure_token[1] == 2        # still one term per block
    assert [tuple(v.shape) for v in ewc._state.variables(EKFAC)[KEYS["d1"]]] == [(6, 6), (4, 4), (6, 4), (6, 4),
                                                                                 (6,), (4,)]
    assert_penalty(ewc, model, as_terms(want), damping=0.0)

    model.get_layer("d1").trainable = False
    fisher, values = random_fisher(model, rng, names=("d2",))
    ewc.add_task(fisher)
    va, vg, s, _, a, g = want["d1"]
    want["d1"] = (va, vg, gamma * s, matrix(model.get_layer("d1")), gamma * a, gamma * g)
    old = want["d2"]
    merged = merge64(old[:3] + old[4:], values["d2"], gamma)
    want["d2"] = merged[:3] + (matrix(model.get_layer("d2")),) + merged[3:]
    assert_online(ewc, want)


def test_an_online_task_without_factors_is_refused_and_changes_nothing():
    """mode="online" needs EKFACBlock's a and g; the error names the layer and the state
    (here one task) is unchanged.  Separate mode takes a block without them."""
    model = mlp()
    ewc = fastewc.EWC(model, lam=LAM, curvature="ekfac", mode="online", gamma=0.5)
    ewc.add_task(random_fisher(model, np.random.default_rng(6))[0])
    before = online_state(ewc)
    with pytest.raises(ValueError, match=r"`fisher`: mode='online' needs the factors' eigenvalues of the EKFAC "
                                         r"block of layer 'd1' \(EKFACBlock's lam_a and lam_g"):
        ewc.add_task(random_fisher(model, np.random.default_rng(7), factors=False)[0])
    fisher = random_fisher(model, np.random.default_rng(7))[0]
    first = fisher.blocks[0]
    for bad_block in (first._replace(lam_a=first.lam_a[:-1]), first._replace(lam_g=-first.lam_g)):
        with pytest.raises(ValueError, match=r"`fisher`: the factors' eigenvalues lam_a, lam_g of the EKFAC block "
                                             r"of layer 'd1' must be finite, >= 0 and one per column of u_a, u_g. "
                                             r"Received: lam_a \((5|6),\), lam_g \(4,\), u_a \(6, 6\)"):
            ewc.add_task(fisher._replace(blocks=[bad_block] + fisher.blocks[1:]))
    assert ewc.num_tasks == 1
    for name, fields in online_state(ewc).items():
        for got, want in zip(fields, before[name]):
            np.testing.assert_array_equal(got, want)
    separate = fastewc.EWC(model, lam=LAM, curvature="ekfac")
    separate.add_task(random_fisher(model, np.random.default_rng(7), factors=False)[0])
    assert separate.num_tasks == 1


def test_damping_adds_delta_to_every_term_against_float64(tmp_path):
    """Separate mode, two tasks, δ = 0.3: P = λ/2 Σ_t Σ (S_t + δ) ⊙ M_t², formed as
    vec(ΔW̄)ᵀ U (diag S + δ I) Uᵀ vec(ΔW̄); δ set later to 0.05 changes the penalty so, and
    a saved file keeps it."""
    model, rng = mlp(), np.random.default_rng(3)
    ewc = fastewc.EWC(model, lam=LAM, curvature="ekfac", damping=0.3)
    want = {"d1": [], "d2": []}
    for t in range(2):
        fisher, values = random_fisher(model, rng)
        ewc.add_task(fisher)
        for name, (ua, ug, s, _, _) in values.items():
            want[name].append((ua, ug, s, matrix(model.get_layer(name))))
        move(model, rng)
    assert_penalty(ewc, model, want, damping=0.3)
    ewc.damping = 0.05
    assert ewc.damping == 0.05
    assert_penalty(ewc, model, want, damping=0.05)
    ewc.save(tmp_path / "damped.npz")
    loaded = fastewc.EWC.load(tmp_path / "damped.npz", model)
    assert loaded.damping == 0.05
    assert_penalty(loaded, model, want, damping=0.05)


def test_damping_and_kfac_sum_are_checked_naming_the_argument():
    model = mlp()
    for bad in (-1.0, float("nan"), float("inf"), "0.1", True):
        with pytest.raises(ValueError, match=r"`damping` must be a finite number >= 0. Received: damping="):
            fastewc.EWC(model, lam=LAM, curvature="ekfac", damping=bad)
    ewc = fastewc.EWC(model, lam=LAM, curvature="ekfac", mode="online", gamma=0.5, damping=0.1)
    with pytest.raises(ValueError, match=r"`damping` must be a finite number >= 0. Received: damping=-1"):
        ewc.damping = -1
    assert ewc.damping == 0.1
    for mode, gamma in (("separate", 1.0), ("online", 0.5)):
        with pytest.raises(ValueError, match=r"`kfac_sum` applies to curvature='kfac' only: curvature='ekfac' "
                                             r"keeps one term per block in mode='online', in the eigenbasis "
                                             r"of the decayed factor sums. Received: kfac_sum='nearest' with "
                                             r"curvature='ekfac'. Leave kfac_sum='exact'."):
            fastewc.EWC(model, lam=LAM, curvature="ekfac", mode=mode, gamma=gamma, kfac_sum="nearest")
    assert "curvature='ekfac' damping=0.1" in repr(ewc)
    fisher, _ = random_fisher(model, np.random.default_rng(0))
    huge = fisher._replace(blocks=[b._replace(s=tf.fill(b.s.shape, 3e38)) for b in fisher.blocks])
    ewc.add_task(huge)
    before = ekfac_state(ewc)
    with pytest.raises(ValueError, match=r"`fisher`: adding this task would make the EKFAC terms of 'd1/kernel' "
                                         r"not finite in float32 \(the weights, S or the eigenvalues are too large\). "
                                         r"The state is unchanged."):
        ewc.add_task(huge)                                   # 0.5 · 3e38 + 3e38 > float32's largest
    assert ewc.num_tasks == 1
    assert_state(ewc, before, rtol=0)


def test_online_with_damping_consolidates_two_tasks_against_float64():
    """EWC(curvature="ekfac", mode="online", gamma, damping) through consolidate: the state
    against merge64 of the float64 factors A, G (the state keeps A_sum's eigenvalues: the
    reference rebuilds A' from them) and of S of float64 per-example gradients in
    the estimator's bases (the task's S projected, as the decayed old one, onto the
    eigenbasis of the factor sums); the penalty and its gradient against float64."""
    model, rng, gamma, damping = mlp(), np.random.default_rng(4), 0.7, 0.05
    ewc = fastewc.EWC(model, lam=LAM, curvature="ekfac", mode="online", gamma=gamma, damping=damping)
    want = {}
    for t in range(2):
        x, y = data(20 + t)
        per_example = per_example64(model, x, y)
        fisher = ewc.consolidate((x, y), loss=LOSS, kind="empirical", jit_compile=False)
        for block in fisher.blocks:
            ua, ug = np.float64(block.u_a), np.float64(block.u_g)
            rows, deltas = per_example[block.layer]
            s = oracle_s([(1.0, np.outer(r, d)) for r, d in zip(rows, deltas)], len(rows), ua, ug)
            a, g = rows.T @ rows / len(rows), deltas.T @ deltas / len(rows)
            old = want.get(block.layer)
            merged = merge64(None if old is None else old[:3] + old[4:], (ua, ug, s, a, g), gamma)
            want[block.layer] = merged[:3] + (matrix(model.get_layer(block.layer)),) + merged[3:]
        move(model, rng)
    assert_online(ewc, want, rtol=1e-4)
    assert_penalty(ewc, model, as_terms(want), damping=damping)


def test_online_state_round_trips_through_a_file_and_a_checkpoint(tmp_path):
    """Online state (one term per block and its eigenvalues) saved and loaded, and
    checkpointed and restored: the same state and penalty, and the next task continues
    identically, as merge64 of the saved state."""
    model, rng, gamma = mlp(), np.random.default_rng(5), 0.5
    settings = dict(lam=LAM, curvature="ekfac", mode="online", gamma=gamma, damping=0.1)
    ewc = fastewc.EWC(model, **settings)
    for t in range(2):
        ewc.add_task(random_fisher(model, rng)[0])
        move(model, rng)
    saved = online_state(ewc)
    ewc.save(tmp_path / "online.npz")
    loaded = fastewc.EWC.load(tmp_path / "online.npz", model)
    path = tf.train.Checkpoint(ewc=ewc).write(str(tmp_path / "ckpt"))
    restored = fastewc.EWC(model, **settings)
    tf.train.Checkpoint(ewc=restored).read(path).assert_consumed()
    fisher, values = random_fisher(model, rng)
    want = {}
    for name, task in values.items():
        merged = merge64(saved[name][:3] + saved[name][4:], task, gamma)
        want[name] = merged[:3] + (matrix(model.get_layer(name)),) + merged[3:]
    for other in (loaded, restored):
        assert (other.mode, other.gamma, other.damping, other.num_tasks) == ("online", gamma, 0.1, 2)
        assert_online(other, saved, rtol=0)
        np.testing.assert_array_equal(other.penalty(), ewc.penalty())
        other.add_task(fisher)
        assert_online(other, want)
    for name, fields in online_state(loaded).items():
        for a, b in zip(fields, online_state(restored)[name]):
            np.testing.assert_array_equal(a, b)
    move(model, rng)
    assert_penalty(loaded, model, as_terms(want), damping=0.1)


def test_a_file_whose_eigenvalues_do_not_fit_their_term_is_refused(tmp_path):
    """A file (checksum valid) whose online block's λ_A' has another length than its
    header's rows (the format's check), or whose block of two terms carries eigenvalues:
    refused, naming the array or the block."""
    from fastewc import ewc_file
    model = mlp()
    ewc = fastewc.EWC(model, lam=LAM, curvature="ekfac", mode="online", gamma=0.5)
    ewc.add_task(random_fisher(model, np.random.default_rng(9))[0])
    ewc.save(tmp_path / "ok.npz")
    contents = ewc_file.read(tmp_path / "ok.npz")
    section = contents.section("ekfac")
    terms, (a, g) = section[KEYS["d1"]]
    section[KEYS["d1"]] = (terms, (a[:-1], g))
    ewc_file.write(tmp_path / "bad.npz", contents)
    with pytest.raises(ValueError, match=r"bad.npz' is not a valid fastewc EWC file \(truncated or corrupted\?\): "
                                         r"array 'ekfla_0' has float32 \(5,\), expected float32 \(6,\)"):
        fastewc.EWC.load(tmp_path / "bad.npz", model)
    section[KEYS["d1"]] = (terms + terms, (a, g))
    ewc_file.write(tmp_path / "bad.npz", contents)
    with pytest.raises(ValueError, match=r"Cannot load EWC state from '.*bad.npz' onto model '.*': the EKFAC state "
                                         r"of 'd1/kernel': its factor sums' eigenvalues \(λ_A', λ_G'\) need one "
                                         r"term \(online mode\) and both vectors. Received: 2 term\(s\) and the "
                                         r"eigenvalues \['lam_a', 'lam_g'\]. Nothing was changed."):
        fastewc.EWC.load(tmp_path / "bad.npz", model)


def _landed(expected, when):
    """``({key: (A, μ)}, {layer: [(U_A, U_G, S, W̄*)]})`` of the landed EWC, float64."""
    state, terms = {}, {}
    for key, value in expected.items():
        parts = key.split("|")
        if parts[0] != when:
            continue
        if parts[1] == "state":
            state.setdefault(parts[2], {})[parts[3]] = np.float64(value)
        elif parts[1] == "terms":
            terms.setdefault(parts[2].split("/")[0], {}).setdefault(int(parts[4]), {})[parts[5]] = np.float64(value)
    return ({k: (v["a"], v["mu"]) for k, v in state.items()},
            {name: [tuple(ts[t][f] for f in ("u_a", "u_g", "s", "anchor")) for t in sorted(ts)]
             for name, ts in terms.items()})


def _landed_reference(model, state, terms, lam, const):
    """λ/2 [Σ A (θ − μ)² + c] + the EKFAC terms (penalty64), gradients in the model's order."""
    value, grads = penalty64(model, terms, lam=lam)
    value += 0.5 * lam * const
    out = []
    for v in model.trainable_variables:
        layer, name = v.path.split("/")[-2:]
        theta = np.float64(v.numpy())
        a, mu = state[f"{layer}/{name}"]
        value += 0.5 * lam * np.sum(a * (theta - mu) ** 2)
        g = lam * a * (theta - mu)
        if layer in grads:
            g = g + (grads[layer][:-1] if name == "kernel" else grads[layer][-1])
        out.append(g)
    return value, out


def _load_landed(directory, source, **settings):
    """The model and the EWC of a landed directory (its file or its checkpoint), at the
    saved weights, and the expected values."""
    with np.load(os.path.join(directory, "expected.npz")) as npz:
        expected = {name: npz[name] for name in npz.files}
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(4, activation="tanh", name="d1"),
                              keras.layers.LayerNormalization(name="ln"), keras.layers.Dense(3, name="d2")])
    if source == "file":
        ewc = fastewc.EWC.load(os.path.join(directory, "ekfac.npz"), model)
        for i, v in enumerate(model.trainable_variables):
            v.assign(expected[f"w{i}"])
    else:
        ewc = fastewc.EWC(model, lam=2.0, curvature="ekfac", **settings)
        tf.train.Checkpoint(model=model, ewc=ewc).read(os.path.join(directory, "ckpt")).assert_consumed()
    return model, ewc, expected


def _check_landed_penalty(ewc, want_value, want_grads):
    value, grads = ewc.penalty_and_gradients()
    np.testing.assert_allclose(float(value), want_value, rtol=2e-5)
    for g, w in zip(grads, want_grads):
        np.testing.assert_allclose(g.numpy(), w, rtol=2e-5, atol=1e-5)


def _landed_task(model, expected, factors=False):
    """The landed next task at its weights: an EKFACFisher of the recorded bases and S (and,
    with ``factors``, the eigenvalues λ_A, λ_G of factors with those eigenbases), and
    ``{layer: (λ_A, λ_G)}``."""
    for i, v in enumerate(model.trainable_variables):
        v.assign(expected[f"w3_{i}"])
    blocks, made = [], {}
    for name in ("d1", "d2"):
        u_a, u_g, s = (expected[f"task|{name}|{f}"] for f in ("u_a", "u_g", "s"))
        lam_a, lam_g = (np.float32(random_eigenvalues(np.random.default_rng(8), len(u))) for u in (u_a, u_g))
        made[name] = (lam_a, lam_g)
        layer = model.get_layer(name)
        blocks.append(EKFACBlock(name, (layer.kernel, layer.bias), *(tf.constant(m) for m in (u_a, u_g, s)),
                                 **({"lam_a": tf.constant(lam_a), "lam_g": tf.constant(lam_g)} if factors else {})))
    diagonal = [tf.constant(expected[f"task|diag{i}"]) if f"task|diag{i}" in expected else None for i in range(6)]
    return EKFACFisher(blocks, diagonal, list(model.trainable_variables)), made


@pytest.mark.parametrize("source", ["file", "checkpoint"])
def test_a_separate_mode_file_and_checkpoint_of_the_landed_code_load_and_continue_identically(source):
    """tests/data/landed_ekfac (written at 4af25ff, before the online mode and damping,
    ``tests/data/make_landed_ekfac.py``): the file and the checkpoint load, the penalty
    and its gradient match the float64 evaluation of the saved state, and after one more
    task both what the old code computed and the float64 merge (a term appended)."""
    model, ewc, expected = _load_landed(LANDED, source)
    assert (ewc.mode, ewc.lam, ewc.curvature, ewc.damping, ewc.num_tasks) == ("separate", 2.0, "ekfac", 0.0, 2)
    state, terms = _landed(expected, "saved")
    assert_state(ewc, terms, rtol=0)
    _check_landed_penalty(ewc, *_landed_reference(model, state, terms, 2.0, float(expected["saved|const"])))
    ewc.add_task(_landed_task(model, expected)[0])
    for name in ("d1", "d2"):
        terms[name].append(tuple(np.float64(expected[f"task|{name}|{f}"]) for f in ("u_a", "u_g", "s"))
                           + (matrix_of(model, name),))
    assert_state(ewc, terms)
    for i, v in enumerate(model.trainable_variables):
        v.assign(expected[f"w4_{i}"])
    _check_landed_penalty(ewc, float(expected["after|value"]), [expected[f"after|grad{i}"] for i in range(6)])
    assert_state(ewc, _landed(expected, "after")[1])


@pytest.mark.parametrize("source", ["file", "checkpoint"])
def test_an_online_file_and_checkpoint_of_the_landed_code_load_and_continue(source):
    """tests/data/landed_ekfac_online (written at 3ec3c05, whose online state kept no factor
    sums): the file and the checkpoint load, the penalty matches the float64 evaluation of
    the saved state; the next task (with its factors) merges as that code did, the factor
    sums before it unknown (A' = 0: the task's basis, S = γ proj(S') + S_t, against float64
    and against what that code computed), and the state's eigenvalues become the task's."""
    model, ewc, expected = _load_landed(LANDED + "_online", source, mode="online", gamma=0.7)
    assert (ewc.mode, ewc.gamma, ewc.curvature, ewc.num_tasks) == ("online", 0.7, "ekfac", 2)
    state, terms = _landed(expected, "saved")
    assert_state(ewc, terms, rtol=0)
    assert EKFAC.eigenvalues(ewc._state.variables(EKFAC)) == {}
    _check_landed_penalty(ewc, *_landed_reference(model, state, terms, 2.0, float(expected["saved|const"])))
    fisher, factors = _landed_task(model, expected, factors=True)
    ewc.add_task(fisher)
    want = {}
    for name in ("d1", "d2"):
        ua, ug, s = (np.float64(expected[f"task|{name}|{f}"]) for f in ("u_a", "u_g", "s"))
        (ua_old, ug_old, s_old, _), = terms[name]
        want[name] = (ua, ug, 0.7 * project64(s_old, ua_old, ug_old, ua, ug) + s, matrix_of(model, name),
                      *(np.float64(f) for f in factors[name]))
    assert_online(ewc, want)
    assert_state(ewc, _landed(expected, "after")[1])
    for i, v in enumerate(model.trainable_variables):
        v.assign(expected[f"w4_{i}"])
    _check_landed_penalty(ewc, float(expected["after|value"]), [expected[f"after|grad{i}"] for i in range(6)])


def matrix_of(model, name):
    return matrix(model.get_layer(name))


def _header(path):
    with np.load(path) as npz:
        return json.loads(npz["header"].tobytes().decode("utf-8"))


def test_an_online_file_is_version_3_refused_by_a_reader_of_versions_1_2(tmp_path, monkeypatch):
    """A file whose EKFAC section carries an online block's eigenvalues declares version 3
    (a separate-mode EKFAC file, as every diagonal or Kronecker one, keeps version 2); a
    reader of versions [1, 2] (fastewc before them: here this reader with EKFAC's versions
    limited to 2) refuses it by its version, not as corrupt; a version above the readable
    ones is refused so; a version-2 header claiming eigenvalues is malformed."""
    from fastewc import ewc_file
    model = mlp()
    online = fastewc.EWC(model, lam=LAM, curvature="ekfac", mode="online", gamma=0.5)
    online.add_task(random_fisher(model, np.random.default_rng(10))[0])
    online.save(tmp_path / "online.npz")
    separate = fastewc.EWC(model, lam=LAM, curvature="ekfac")
    separate.add_task(random_fisher(model, np.random.default_rng(10), factors=False)[0])
    separate.save(tmp_path / "separate.npz")
    assert _header(tmp_path / "online.npz")["version"] == 3
    assert _header(tmp_path / "separate.npz")["version"] == 2
    assert ewc_file.readable_versions() == (1, 2, 3)
    with monkeypatch.context() as patch:
        patch.setattr(EKFAC, "file_versions", classmethod(lambda cls: (2,)))
        with pytest.raises(ValueError, match=r"online.npz' has EWC file version 3; this fastewc reads "
                                             r"versions \[1, 2\]\.$"):
            ewc_file.read(tmp_path / "online.npz")
        assert ewc_file.read(tmp_path / "separate.npz").section("ekfac")
    contents = ewc_file.read(tmp_path / "online.npz")
    patched = EKFAC.file_version
    with monkeypatch.context() as patch:
        patch.setattr(EKFAC, "file_version", classmethod(lambda cls, section: 4))
        ewc_file.write(tmp_path / "v4.npz", contents)
        patch.setattr(EKFAC, "file_version", classmethod(lambda cls, section: 2))
        ewc_file.write(tmp_path / "v2.npz", contents)
    assert EKFAC.file_version == patched
    with pytest.raises(ValueError, match=r"v4.npz' has EWC file version 4; this fastewc reads versions "
                                         r"\[1, 2, 3\]\.$"):
        fastewc.EWC.load(tmp_path / "v4.npz", model)
    with pytest.raises(ValueError, match=r"v2.npz' is not a valid fastewc EWC file \(truncated or corrupted\?\): "
                                         r"bad EKFAC block list \(ValueError: 'eigenvalues' needs file version 3, "
                                         r"the header says 2\)"):
        fastewc.EWC.load(tmp_path / "v2.npz", model)
    loaded = fastewc.EWC.load(tmp_path / "online.npz", model)
    assert_online(loaded, online_state(online), rtol=0)
