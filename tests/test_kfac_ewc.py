"""fastewc.EWC with curvature="kfac" against float64 NumPy references that form every
Kronecker product explicitly (np.kron, row-major vec(W̄), the bias as W̄'s last row):

    P(θ) = λ/2 Σ_blocks Σ_t c_t vec(W̄ − W̄_t)ᵀ (A_t,δ ⊗ G_t,δ) vec(W̄ − W̄_t)
         + λ/2 Σ_t c_t Σ_i F_t,i (θ_i − θ_t,i)²          (variables no block covers)

for separate, online exact and online nearest (the nearest Kronecker product from the SVD
of the Van Loan rearrangement of the explicit sum), damped and undamped; the nearest-vs-exact
gap over five tasks; singular factors; the all-or-nothing add_task; the compiled train step
and `exclude`.  The factors themselves are checked in test_kfac_fisher.py, the maths module
in test_kronecker.py."""
import contextlib
from typing import NamedTuple

import keras
import numpy as np
import pytest
import tensorflow as tf

import fastewc
from fastewc.curvature import KroneckerFisher

from conftest import assert_close, perturb, weights64

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
LAM = 2.0
GAMMA = 0.5
DAMPING = 0.05
MODES = [("separate", "exact", 1.0), ("online", "exact", GAMMA), ("online", "nearest", GAMMA)]


# -- models and tasks -----------------------------------------------------------------------
def dense_model():
    """Dense(5→4), a LayerNormalization (diagonal part), Dense(4→3)."""
    keras.utils.set_random_seed(11)
    return keras.Sequential([keras.Input((5,)), keras.layers.Dense(4, activation="tanh", name="d1"),
                             keras.layers.LayerNormalization(name="ln"), keras.layers.Dense(3, name="d2")])


def conv_model():
    """Conv2D(2→3, 2×2, stride 2) on 5×5 inputs (W̄ 9×3), then Dense(12→2)."""
    keras.utils.set_random_seed(12)
    return keras.Sequential([keras.Input((5, 5, 2)),
                             keras.layers.Conv2D(3, 2, strides=2, activation="tanh", name="c1"),
                             keras.layers.Flatten(name="flat"), keras.layers.Dense(2, name="d2")])


MODELS = {"dense": dense_model, "conv": conv_model}


def task_data(model, seed, n=6):
    rng = np.random.default_rng(seed)
    classes = model.output_shape[-1]
    x = rng.normal(size=(n,) + tuple(model.input_shape[1:])).astype(np.float32)
    return x, rng.integers(0, classes, size=n)




@contextlib.contextmanager
def moved(model, seed, scale=0.3):
    """The model's weights perturbed inside the block, restored after."""
    saved = [v.numpy() for v in model.trainable_variables]
    perturb(model, seed, scale)
    try:
        yield
    finally:
        for v, s in zip(model.trainable_variables, saved):
            v.assign(s)


# -- the float64 reference ------------------------------------------------------------------
class Task(NamedTuple):
    """One task as the reference sees it (float64): per block (kernel index, bias index or
    None) its (A, G); per uncovered variable index its diagonal F; the weights θ_t."""
    blocks: dict
    diag: dict
    theta: list


def record(model, fisher):
    """The Task of a KroneckerFisher returned by consolidate, at the model's current weights."""
    index = {id(v): i for i, v in enumerate(model.trainable_variables)}
    blocks = {}
    for block in fisher.blocks:
        ids = [index[id(v)] for v in block.variables]
        key = (ids[0], ids[1] if len(ids) > 1 else None)
        blocks[key] = (np.asarray(block.a, np.float64), np.asarray(block.g, np.float64))
    diag = {i: np.asarray(f, np.float64) for i, f in enumerate(fisher.diagonal) if f is not None}
    return Task(blocks, diag, weights64(model))


def wbar(thetas, key):
    """W̄ (d', u) in float64: the kernel reshaped row-major, the bias as the last row."""
    kernel = thetas[key[0]]
    m = kernel.reshape(-1, kernel.shape[-1])
    return m if key[1] is None else np.vstack([m, thetas[key[1]][None]])


def damped(a, g, damping):
    """A + π√δ I, G + √δ/π I, π = sqrt((tr A/d') / (tr G/u)) (1 if a trace is 0)."""
    d, u = len(a), len(g)
    ok = np.trace(a) > 0 and np.trace(g) > 0
    pi = np.sqrt((np.trace(a) / d) / (np.trace(g) / u)) if ok else 1.0
    root = np.sqrt(damping)
    return a + pi * root * np.eye(d), g + root / pi * np.eye(u)


def nearest_kron(s, d, u):
    """Van Loan & Pitsianis: R(S)[(i,k), (j,l)] = S[(i,j), (k,l)] so that R(A ⊗ G) =
    vec(A) vec(G)ᵀ; the leading singular triple of R(S) gives the nearest A ⊗ G."""
    r = s.reshape(d, u, d, u).transpose(0, 2, 1, 3).reshape(d * d, u * u)
    left, sigma, right = np.linalg.svd(r)
    a = np.sqrt(sigma[0]) * left[:, 0].reshape(d, d)
    g = np.sqrt(sigma[0]) * right[0].reshape(u, u)
    return (-a, -g) if np.trace(a) < 0 else (a, g)


class Terms(NamedTuple):
    """The reference precision: {block key: [(c, A, G, W̄*)]} and {variable index: [(c, F, θ*)]}."""
    blocks: dict
    diag: dict


def reference_terms(tasks, mode, kfac_sum, gamma):
    """What the state should hold after ``tasks``, built from the definitions."""
    blocks, diag = {}, {}
    last = len(tasks) - 1
    for t, task in enumerate(tasks):
        coef = 1.0 if mode == "separate" else gamma ** (last - t)
        anchor = task.theta if mode == "separate" else tasks[-1].theta
        for i, f in task.diag.items():
            diag.setdefault(i, []).append((coef, f, anchor[i]))
        if kfac_sum == "exact":
            for key, (a, g) in task.blocks.items():
                blocks.setdefault(key, []).append((coef, a, g, wbar(anchor, key)))
    if kfac_sum == "nearest":                 # one term, merged task by task
        for key in tasks[0].blocks:
            a, g = tasks[0].blocks[key]
            for task in tasks[1:]:
                a_new, g_new = task.blocks[key]
                a, g = nearest_kron(gamma * np.kron(a, g) + np.kron(a_new, g_new), len(a), len(g))
            blocks[key] = [(1.0, a, g, wbar(tasks[-1].theta, key))]
    return Terms(blocks, diag)


def reference_penalty(thetas, terms, lam=LAM, damping=0.0):
    """(value, grads) in float64 with explicit np.kron: λ/2 vᵀ K v and λ/2 (K + Kᵀ) v."""
    value, grads = 0.0, [np.zeros_like(t) for t in thetas]
    for key, block_terms in terms.blocks.items():
        w = wbar(thetas, key)
        for coef, a, g, anchor in block_terms:
            a_d, g_d = damped(a, g, damping)
            k = coef * np.kron(a_d, g_d)
            v = (w - anchor).reshape(-1)
            value += 0.5 * lam * v @ k @ v
            grad = (0.5 * lam * (k + k.T) @ v).reshape(w.shape)
            rows = int(np.prod(thetas[key[0]].shape[:-1]))
            grads[key[0]] += grad[:rows].reshape(thetas[key[0]].shape)
            if key[1] is not None:
                grads[key[1]] += grad[rows]
    for i, diag_terms in terms.diag.items():
        for coef, f, anchor in diag_terms:
            value += 0.5 * lam * coef * np.sum(f * (thetas[i] - anchor) ** 2)
            grads[i] += lam * coef * f * (thetas[i] - anchor)
    return value, grads


def assert_penalty_matches(ewc, terms, damping, rtol=1e-5, compiled=False):
    """ewc.penalty() (value and tape gradient), penalty_and_gradients() and
    penalty_gradients() against the float64 reference; with ``compiled``, also the value and
    tape gradient of ewc.penalty() inside a tf.function."""
    model = ewc.model
    variables = model.trainable_variables
    want_value, want_grads = reference_penalty(weights64(model), terms, damping=damping)

    def taped():
        with tf.GradientTape() as tape:
            value = ewc.penalty()
        grads = tape.gradient(value, variables)         # None: a variable the penalty ignores
        return value, [tf.zeros(v.shape) if g is None else g for v, g in zip(variables, grads)]

    results = [taped(), ewc.penalty_and_gradients()]
    if compiled:
        results.append(tf.function(taped, autograph=False)())
    direct = ewc.penalty_gradients()
    for value, _ in results:
        assert value.shape == () and value.dtype == tf.float32
        assert_close(value, want_value, rtol)
    for i, (v, want) in enumerate(zip(variables, want_grads)):
        for g in [grads[i] for _, grads in results] + [direct[i]]:
            assert tuple(g.shape) == tuple(v.shape) and g.dtype == tf.float32, v.path
            assert_close(g, want, rtol)


def run_tasks(ewc, num_tasks, seed=0, record_into=None):
    """Perturb, consolidate, record: ``num_tasks`` times; returns the recorded Tasks."""
    model = ewc.model
    tasks = [] if record_into is None else record_into
    for t in range(num_tasks):
        perturb(model, seed=100 * seed + t)
        fisher = ewc.consolidate(task_data(model, seed=100 * seed + t), loss=LOSS, kind="exact",
                                 jit_compile=False)       # no XLA: a faster first trace
        assert isinstance(fisher, KroneckerFisher)
        tasks.append(record(model, fisher))
    return tasks


def kfac_ewc(model, mode="separate", kfac_sum="exact", gamma=1.0, **kwargs):
    return fastewc.EWC(model, lam=LAM, mode=mode, gamma=gamma, curvature="kfac", kfac_sum=kfac_sum,
                       **kwargs)


def state_key(model, key):
    """The kronecker_state key (kernel path, bias path or None) of a reference block key."""
    variables = model.trainable_variables
    relative = [None if i is None else variables[i].path.split("/", 1)[1] for i in key]
    return tuple(relative)


# -- 1. value and gradient against explicit Kronecker products ------------------------------
@pytest.mark.parametrize("model_name", sorted(MODELS))
@pytest.mark.parametrize("mode, kfac_sum, gamma", MODES)
def test_penalty_matches_explicit_kron(model_name, mode, kfac_sum, gamma):
    model = MODELS[model_name]()
    ewc = kfac_ewc(model, mode, kfac_sum, gamma, damping=DAMPING)
    tasks = run_tasks(ewc, 3)
    terms = reference_terms(tasks, mode, kfac_sum, gamma)
    # The state holds those terms (coefficients, anchors; the factors of the exact sums).
    state = ewc.kronecker_state()
    assert sorted(state) == sorted(state_key(model, key) for key in terms.blocks)
    for key, want in terms.blocks.items():
        got = state[state_key(model, key)]
        assert len(got) == len(want)
        for (c, a, g, anchor), (c_ref, a_ref, g_ref, anchor_ref) in zip(got, want):
            np.testing.assert_allclose(c, c_ref, rtol=1e-7)
            np.testing.assert_array_equal(anchor, anchor_ref.astype(np.float32))
            if kfac_sum == "exact":
                np.testing.assert_array_equal(a, a_ref.astype(np.float32))
                np.testing.assert_array_equal(g, g_ref.astype(np.float32))
            else:
                assert_close(np.kron(a, g), np.kron(a_ref, g_ref))
    if mode == "online":                     # every anchor is the latest weights: P = 0
        assert ewc.penalty().numpy() == 0.0
        assert all(np.all(g.numpy() == 0.0) for g in ewc.penalty_gradients())
    perturb(model, seed=99)
    assert_penalty_matches(ewc, terms, damping=DAMPING, compiled=(model_name, mode) == ("dense", "separate"))
    ewc.damping = 0.0                        # settable: the compiled penalty reads it
    assert_penalty_matches(ewc, terms, damping=0.0)


# -- 2. how far apart nearest and exact are ---------------------------------------------------
def _frobenius_gap(exact_state, nearest_state):
    """Per block ‖Σ_t c_t A_t ⊗ G_t − A ⊗ G‖_F and ‖Σ_t c_t A_t ⊗ G_t‖_F, float64."""
    out = {}
    for key, terms in exact_state.items():
        s = sum(float(c) * np.kron(a.astype(np.float64), g.astype(np.float64)) for c, a, g, _ in terms)
        ((c, a, g, _),) = nearest_state[key]
        n = float(c) * np.kron(a.astype(np.float64), g.astype(np.float64))
        out[key] = (np.linalg.norm(s - n), np.linalg.norm(s))
    return out


def test_nearest_vs_exact_over_five_online_tasks(record_property):
    """Only what is guaranteed is asserted: equal after one task; both ≥ 0; and
    |P_nearest − P_exact| ≤ λ/2 Σ_b ‖S_b − N_b‖_F ‖vec Δ_b‖² (spectral ≤ Frobenius norm;
    the diagonal parts are identical).  The relative gaps are recorded."""
    model = dense_model()
    exact = kfac_ewc(model, "online", "exact", GAMMA)
    nearest = kfac_ewc(model, "online", "nearest", GAMMA)
    probes = [(7, 0.05), (8, 0.3), (9, 1.0)]
    gaps = []
    for t in range(5):
        perturb(model, seed=t)
        fisher = exact.consolidate(task_data(model, seed=t), loss=LOSS, kind="exact", jit_compile=False)
        nearest.add_task(fisher)
        state_e, state_n = exact.kronecker_state(), nearest.kronecker_state()
        frob = _frobenius_gap(state_e, state_n)
        anchor = {key: terms[0][3].astype(np.float64) for key, terms in state_e.items()}
        row = []
        for seed, scale in probes:
            with moved(model, seed, scale):
                p_e, p_n = float(exact.penalty()), float(nearest.penalty())
                thetas = {v.path.split("/", 1)[1]: v.numpy().astype(np.float64)
                          for v in model.trainable_variables}
            assert p_e >= 0 and p_n >= 0         # PSD precisions
            assert p_e > 0                       # (here: the LayerNormalization's F > 0)
            bound = sum(0.5 * LAM * frob[key][0] * np.sum(
                (wbar(thetas, key) - anchor[key]) ** 2) for key in frob)
            assert abs(p_n - p_e) <= bound + 1e-5 * p_e, (t, scale, p_n, p_e, bound)
            if t == 0:
                np.testing.assert_allclose(p_n, p_e, rtol=1e-5)
            row.append(abs(p_n - p_e) / p_e)
        gaps.append(row)
        frob_rel = max(diff / norm for diff, norm in frob.values())
        print(f"task {t + 1}: relative |P_nearest - P_exact| / P_exact at scales "
              f"{[s for _, s in probes]}: {['%.3g' % g for g in row]}; "
              f"max block ||S - N||_F / ||S||_F = {frob_rel:.3g}")
        record_property(f"task{t + 1}_relative_penalty_gap", [float(g) for g in row])
        record_property(f"task{t + 1}_relative_frobenius_gap", float(frob_rel))
    assert max(gaps[0]) <= 1e-5


# -- 3. singular factors stay finite --------------------------------------------------------
def singular_model(use_bias=True):
    keras.utils.set_random_seed(13)
    return keras.Sequential([keras.Input((4,)),
                             keras.layers.Dense(3, activation="tanh", use_bias=use_bias, name="d1"),
                             keras.layers.Dense(2, name="d2")])


def _assert_finite(ewc):
    value, grads = ewc.penalty_and_gradients()
    with tf.GradientTape() as tape:
        taped_value = ewc.penalty()
    taped = tape.gradient(taped_value, ewc.model.trainable_variables)
    for t in [value, taped_value, *grads, *taped, *ewc.penalty_gradients()]:
        assert np.all(np.isfinite(t.numpy()))
    return float(value)


@pytest.mark.parametrize("mode, kfac_sum, gamma", MODES)
def test_singular_factors_stay_finite(mode, kfac_sum, gamma):
    """One example per task with a constant-zero input feature: the first block's A is
    rank 1 with a zero row and column.  Undamped and damped: finite, and equal to the
    reference (the merge of such terms included)."""
    model = singular_model()
    ewc = kfac_ewc(model, mode, kfac_sum, gamma)
    tasks = []
    for t in range(3):
        perturb(model, seed=t)
        x, y = task_data(model, seed=t, n=1)
        x[:, 2] = 0.0
        fisher = ewc.consolidate((x, y), loss=LOSS, kind="exact", jit_compile=False)
        tasks.append(record(model, fisher))
    a = tasks[0].blocks[(0, 1)][0]
    assert np.linalg.matrix_rank(a, tol=1e-6 * np.abs(a).max()) == 1
    for key, terms in ewc.kronecker_state().items():
        assert all(np.all(np.isfinite(v)) for term in terms for v in term)
        if key[0] == "d1/kernel":            # merged or not, the zero row and column stay
            assert all(np.all(term[1][2] == 0) and np.all(term[1][:, 2] == 0) for term in terms)
    terms = reference_terms(tasks, mode, kfac_sum, gamma)
    perturb(model, seed=50)
    for damping in (0.0, DAMPING):
        ewc.damping = damping
        assert _assert_finite(ewc) > 0
        assert_penalty_matches(ewc, terms, damping)


@pytest.mark.parametrize("kfac_sum", ["exact", "nearest"])
def test_zero_factor_stays_finite(kfac_sum):
    """All-zero inputs into a Dense without bias: A = 0 (π falls back to 1, the nearest
    merge of zero products is A = 0); undamped the block adds nothing, damped at least
    λ/2 δ Σ_t c_t ‖Δ‖²."""
    model = singular_model(use_bias=False)
    ewc = kfac_ewc(model, "online", kfac_sum, GAMMA)
    tasks = []
    for t in range(3):
        perturb(model, seed=t)
        x, y = task_data(model, seed=t, n=2)
        fisher = ewc.consolidate((np.zeros_like(x), y), loss=LOSS, kind="exact", jit_compile=False)
        tasks.append(record(model, fisher))
    (terms,) = [terms for key, terms in ewc.kronecker_state().items() if key[0] == "d1/kernel"]
    assert all(np.all(np.isfinite(v)) for term in terms for v in term)
    assert all(np.all(term[1] == 0) for term in terms)
    perturb(model, seed=50)
    anchor = terms[0][3].astype(np.float64)
    delta = model.get_layer("d1").kernel.numpy().astype(np.float64) - anchor
    undamped = _assert_finite(ewc)
    assert_penalty_matches(ewc, reference_terms(tasks, "online", kfac_sum, GAMMA), 0.0)
    ewc.damping = DAMPING
    damped_value = _assert_finite(ewc)
    if kfac_sum == "exact":      # (the nearest of zero products keeps an arbitrary G: no reference)
        assert_penalty_matches(ewc, reference_terms(tasks, "online", kfac_sum, GAMMA), DAMPING)
    coefs = sum(float(term[0]) for term in terms)
    # A = 0, π = 1: A_δ ⊗ G_δ = √δ I ⊗ G + δ I ⪰ δ I (G PSD), and damping never lowers the
    # other block's terms: the penalty grows by at least λ/2 δ Σ_t c_t ‖Δ‖².
    assert damped_value >= undamped + 0.5 * LAM * DAMPING * coefs * np.sum(delta ** 2) * (1 - 1e-5)


# -- 4. add_task is all or nothing; argument checks ------------------------------------------
def _snapshot(ewc):
    return ewc.kronecker_state(), ewc.state(), ewc.num_tasks, ewc.structure_token


def _assert_same(before, after):
    (k0, s0, n0, t0), (k1, s1, n1, t1) = before, after
    assert (n0, t0) == (n1, t1)
    assert sorted(k0) == sorted(k1) and sorted(s0) == sorted(s1)
    for key in k0:
        assert len(k0[key]) == len(k1[key])
        for term0, term1 in zip(k0[key], k1[key]):
            for v0, v1 in zip(term0, term1):
                np.testing.assert_array_equal(v0, v1)
    for key in s0:
        for v0, v1 in zip(s0[key], s1[key]):
            np.testing.assert_array_equal(v0, v1)


@pytest.mark.parametrize("mode, kfac_sum, gamma", MODES)
def test_nan_factor_raises_and_changes_nothing(mode, kfac_sum, gamma, monkeypatch):
    model = dense_model()
    ewc = kfac_ewc(model, mode, kfac_sum, gamma)
    run_tasks(ewc, 1)
    before = _snapshot(ewc)
    perturb(model, seed=5)
    fisher = fastewc.kfac_fisher(model, task_data(model, seed=5), loss=LOSS, kind="exact",
                                 jit_compile=False)
    for factor in ("a", "g"):
        bad = [b._replace(**{factor: tf.tensor_scatter_nd_update(getattr(b, factor), [[0, 0]], [np.nan])})
               if b.layer == "d2" else b for b in fisher.blocks]
        with pytest.raises(ValueError, match=rf"factor {factor.upper()} of layer 'd2'"):
            ewc.add_task(fisher._replace(blocks=bad))
        _assert_same(before, _snapshot(ewc))

    def interrupted(*args, **kwargs):         # the commit fails after every block was written
        raise RuntimeError("interrupted")

    monkeypatch.setattr(ewc._const, "assign_add", interrupted)
    with pytest.raises(RuntimeError, match="interrupted"):
        ewc.add_task(fisher)
    monkeypatch.undo()
    _assert_same(before, _snapshot(ewc))      # the new terms were dropped, the merged ones restored
    ewc.add_task(fisher)                      # the valid task still goes in
    assert ewc.num_tasks == 2
    assert ewc.structure_token[1] == (4 if mode == "separate" or kfac_sum == "exact" else 2)


def test_wrong_fisher_types_raise():
    model = dense_model()
    x, y = task_data(model, seed=0)
    fisher = fastewc.kfac_fisher(model, (x, y), loss=LOSS, kind="exact", jit_compile=False)
    diagonal = fastewc.EWC(model, lam=LAM)
    with pytest.raises(ValueError, match=r"KroneckerFisher, but this EWC has curvature='diagonal'"):
        diagonal.add_task(fisher)
    assert diagonal.num_tasks == 0
    ewc = kfac_ewc(model)
    with pytest.raises(TypeError, match=r"must be a fastewc.KroneckerFisher"):
        ewc.add_task([tf.ones(v.shape) for v in model.trainable_variables])
    with pytest.raises(ValueError, match=r"`method` must be 'auto' or 'factored' with curvature='kfac'"):
        ewc.consolidate((x, y), loss=LOSS, method="vmap")
    assert ewc.num_tasks == 0 and ewc.kronecker_state() == {}


def test_bad_options_raise():
    model = dense_model()
    with pytest.raises(ValueError, match=r"kfac_sum`='nearest' applies to mode='online' only"):
        kfac_ewc(model, "separate", "nearest")
    for damping in (-0.1, float("nan"), float("inf"), True):
        with pytest.raises(ValueError, match=r"`damping` must be a finite number >= 0"):
            kfac_ewc(model, damping=damping)
    ewc = kfac_ewc(model, damping=DAMPING)
    with pytest.raises(ValueError, match=r"`damping` must be a finite number >= 0"):
        ewc.damping = -1.0
    assert ewc.damping == DAMPING
    with pytest.raises(ValueError, match=r"`curvature` must be one of"):
        fastewc.EWC(model, lam=LAM, curvature="bogus")
    with pytest.raises(ValueError, match=r"`kfac_sum` must be one of"):
        kfac_ewc(model, "online", "bogus", GAMMA)
    with pytest.raises(ValueError, match=r"apply to curvature='kfac' or 'ekfac' only"):
        fastewc.EWC(model, lam=LAM, damping=0.1)


# -- 5. the compiled train step ---------------------------------------------------------------
def _assert_step_matches(step, ewc, terms, x, y, lr):
    """One SGD step equals θ − lr (∇L_data + ∇P), ∇L_data from an eager tape, ∇P the float64
    reference; the returned loss is L_data + P before the update."""
    model = ewc.model
    before = weights64(model)
    with tf.GradientTape() as tape:
        data_loss = LOSS(y, model(x, training=True))
    data_grads = tape.gradient(data_loss, model.trainable_variables)
    p_value, p_grads = reference_penalty(before, terms)
    returned = step(x, y)
    assert_close(returned, float(data_loss) + p_value)
    for v, w0, g, p in zip(model.trainable_variables, before, data_grads, p_grads):
        want = -lr * (g.numpy().astype(np.float64) + p)
        assert_close(v.numpy().astype(np.float64) - w0, want, rtol=1e-4)


@pytest.mark.parametrize("jit_compile", [False, True])
def test_train_step_adds_the_kronecker_gradient_and_retraces(jit_compile):
    model = dense_model()
    ewc = kfac_ewc(model)
    assert ewc.penalty().numpy() == 0.0                  # nothing consolidated yet
    tasks = run_tasks(ewc, 1)
    assert ewc.penalty().numpy() == 0.0                  # at the only task's anchor
    assert all(np.all(g.numpy() == 0.0) for g in ewc.penalty_gradients())
    lr = 0.1
    step = fastewc.make_train_step(model, keras.optimizers.SGD(lr), LOSS, ewc=ewc, jit_compile=jit_compile)
    x, y = task_data(model, seed=42, n=8)
    perturb(model, seed=43)
    _assert_step_matches(step, ewc, reference_terms(tasks, "separate", "exact", 1.0), x, y, lr)
    traces, token = step.tracing_count(), ewc.structure_token
    run_tasks(ewc, 1, seed=1, record_into=tasks)            # separate: one more term per block
    assert ewc.structure_token != token
    perturb(model, seed=44)
    _assert_step_matches(step, ewc, reference_terms(tasks, "separate", "exact", 1.0), x, y, lr)
    assert step.tracing_count() == traces + 1
    _assert_step_matches(step, ewc, reference_terms(tasks, "separate", "exact", 1.0), x, y, lr)
    assert step.tracing_count() == traces + 1               # and not again


# -- 6. exclude ---------------------------------------------------------------------------------
def test_excluding_a_whole_block_drops_it():
    model = dense_model()
    d1 = model.get_layer("d1")
    ewc = kfac_ewc(model, exclude=[d1.kernel, d1.bias])
    tasks = run_tasks(ewc, 2)
    assert sorted(ewc.kronecker_state()) == [("d2/kernel", "d2/bias")]
    assert "d1/kernel" not in ewc.state() and "d1/bias" not in ewc.state()
    terms = reference_terms(tasks, "separate", "exact", 1.0)
    del terms.blocks[(0, 1)]
    perturb(model, seed=9)
    assert_penalty_matches(ewc, terms, damping=0.0)


def test_excluding_part_of_a_block_raises():
    model = dense_model()
    ewc = kfac_ewc(model, exclude=[model.get_layer("d1").kernel])
    before = _snapshot(ewc)
    with pytest.raises(ValueError, match=r"`exclude` covers part of layer 'd1''s Kronecker block"):
        ewc.consolidate(task_data(model, seed=0), loss=LOSS, kind="exact", jit_compile=False)
    _assert_same(before, _snapshot(ewc))
