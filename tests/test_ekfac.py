"""curvature="ekfac" (fastewc/blocks/ekfac.py) against a float64 NumPy oracle on a tiny
Dense MLP (one position per example): per-example gradients by a loop (manual backprop),
A = (1/N) Σ ā āᵀ, G = (1/N) Σ δ δᵀ (empirical: the true label), their eigenbases, the
EKFAC second moments S_ij = (1/N) Σ_n (U_Aᵀ ḡ_n U_G)_ij² (the estimator's, from its two
passes: against per-example float64 gradients of a float64 twin, in the bases it
returns, which must diagonalize fastewc.testing's float64 factors), and the penalty

    P = λ/2 Σ_t Σ_ij (S_t)_ij (U_A,tᵀ (W̄ − W̄_t) U_G,t)_ij²  (+ the diagonal rest)

with its gradient, formed explicitly as vec(ΔW̄)ᵀ (U_A ⊗ U_G) diag(vec S) (U_A ⊗ U_G)ᵀ vec(ΔW̄)
(np.kron, row-major vec, the bias as W̄'s last row); then a save/load and a checkpoint
round trip."""
import keras
import numpy as np
import pytest
import tensorflow as tf

import fastewc
from fastewc.blocks.ekfac import EKFACBlock, EKFACFisher, second_moments
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


def test_consolidate_runs_the_estimator_and_online_is_refused():
    model = mlp()
    x, y = data(4)
    ewc = fastewc.EWC(model, lam=LAM, curvature="ekfac")
    fisher = ewc.consolidate((x, y), loss=LOSS, kind="empirical", jit_compile=False)
    assert isinstance(fisher, EKFACFisher)
    assert float(ewc.penalty()) == 0.0                       # at the anchors
    with pytest.raises(ValueError, match="mode='separate' only"):
        fastewc.EWC(model, lam=LAM, curvature="ekfac", mode="online")
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
    with pytest.raises(ValueError, match="apply to curvature='kfac' only"):
        fastewc.EWC(model, lam=LAM, curvature="ekfac", damping=0.1)
    with pytest.raises(ValueError, match="apply to curvature='kfac' only"):
        fastewc.EWC(model, lam=LAM, curvature="ekfac", kfac_sum="nearest")
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
