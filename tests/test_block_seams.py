"""The seams a new block kind plugs into without editing files outside fastewc/blocks/
(issue 25 item 3): its own EWC file section, the demo's methods from the kinds, a second
estimation pass.  Each is exercised with a fake kind registered in ``fastewc.blocks.KINDS``
for the test only, against NumPy references."""
import json
import zipfile

import numpy as np
import pytest

from fastewc import blocks, ewc_file
from fastewc.blocks.base import Block


class _FileOnlyKind(Block):
    """A kind with just a file section: ``{name: vector}`` arrays ``fakev_j`` (its file
    version from :class:`Block`'s defaults)."""
    kind = "fake"
    FILE_FIELD, FILE_VERSION = "fake_section", 2

    @staticmethod
    def file_arrays(section):
        names = sorted(section)
        return {"fake_section": names}, {f"fakev_{j}": np.asarray(section[n], np.float32)
                                         for j, n in enumerate(names)}

    @staticmethod
    def file_shapes(header):
        return {f"fakev_{j}": (3,) for j, _ in enumerate(header.get("fake_section", []))}

    @staticmethod
    def read_file_arrays(header, arrays):
        return {n: arrays[f"fakev_{j}"] for j, n in enumerate(header.get("fake_section", []))}


def test_a_kind_owns_its_file_section(tmp_path, monkeypatch):
    """A kind's section goes through EWCFile.sections keyed by its FILE_FIELD: written as
    its own header field and arrays, read back into the same key, without a field of
    EWCFile for it; the diagonal's ``state`` and old readers' ``kronecker`` stay."""
    monkeypatch.setitem(blocks.KINDS, "fake", _FileOnlyKind)
    vectors = {"b": np.array([1.0, -2.0, 3.5], np.float32), "a": np.array([0.0, 1e-3, 7.0], np.float32)}
    state = {"dense/kernel": (np.full((2, 3), 0.5, np.float32), np.ones((2, 3), np.float32))}
    contents = ewc_file.EWCFile(mode="separate", lam=2.0, gamma=1.0, num_tasks=1, const=0.0,
                                state=state, excluded=[], curvature="diagonal",
                                sections={"fake_section": vectors})
    path = tmp_path / "ewc.npz"
    ewc_file.write(path, contents)
    with zipfile.ZipFile(path) as z:
        header = json.loads(np.load(path)["header"].tobytes().decode("utf-8"))
        names = sorted(n[:-4] for n in z.namelist())
    assert header["version"] == 2 and header["fake_section"] == ["a", "b"]
    assert names == ["anchor_0", "fakev_0", "fakev_1", "fisher_0", "header"]
    back = ewc_file.read(path)
    assert {"fake_section", "kronecker"} <= set(back.sections) and "state" not in back.sections
    assert back.kronecker == {} and back.section("kronecker") == {}
    for name, vector in vectors.items():
        np.testing.assert_array_equal(back.section("fake_section")[name], vector)
    np.testing.assert_array_equal(back.state["dense/kernel"][0], state["dense/kernel"][0])


class _DemoKind:
    """A kind as the demo sees it: its methods' prefix and title, its modes and options."""
    kind, METHOD, TITLE, MODES, OPTIONS = "fake", "fake", "Fake-EWC", ("separate",), ()


def test_the_demo_takes_its_methods_and_options_from_the_kinds(monkeypatch):
    """A registered kind gets demo methods (one per mode it takes), its curvature name
    back from a method, λ = kfac_lam, and only the options it reads passed to the EWC;
    an option it does not read is refused, naming it."""
    from fastewc.demo import run
    monkeypatch.setitem(blocks.KINDS, "fake", _DemoKind)
    assert run.methods_for("fake") == ("finetune", "ewc_separate", "ewc_online", "fake_separate")
    assert run.methods_for("diagonal") == run.METHODS == ("finetune", "ewc_separate", "ewc_online")
    assert run.KFAC_METHODS == ("kfac_separate", "kfac_online")
    assert run.method_spec("fake_separate") == ("separate", "fake")
    assert run.method_spec("kfac_online") == ("online", "kfac")
    assert run.ewc_options("fake", "separate", 0.5, "nearest") == {"curvature": "fake"}
    assert run.ewc_options("kfac", "separate", 0.5, "nearest") == {"curvature": "kfac", "damping": 0.5,
                                                                   "kfac_sum": "exact"}
    config = run.DemoConfig(curvature="fake", out="unused").resolved()
    assert config.methods[-1] == "fake_separate" and config.lam_of("fake_separate") == config.kfac_lam > 0
    assert config.lam_of("ewc_online") == config.lam
    with pytest.raises(ValueError, match=r"`damping` applies to curvature='kfac' or 'ekfac' only. "
                                         r"Received: damping=0.1 with curvature='fake'"):
        run.DemoConfig(curvature="fake", damping=0.1, out="unused").resolved()


# -- a second estimation pass --------------------------------------------------------------
import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

import fastewc  # noqa: E402
from fastewc.blocks.base import Block  # noqa: E402
from fastewc.blocks.kronecker import Kronecker  # noqa: E402


class _Moments(Block):
    """The second-pass block of :class:`_TwoPass`: Σ_kn w_kn ḡ_kn² · tr(G) from the rule's
    per-example rows, tr(G) read from a variable :meth:`prepare` sets."""
    kind = "twopass"
    own_sums = True

    def __init__(self, first):
        self.variables = first.variables
        shape = (first.sum_shapes[0][0], first.sum_shapes[1][0])
        self.sum_shapes, self.sum_names = (shape,), ("moments",)
        self.trace = tf.Variable(0.0, trainable=False)

    def prepare(self, first):
        self.trace.assign(tf.linalg.trace(first.g))

    def rule_sums(self, result, delta, weight, mask):
        out = {}
        for sums in result.kron(delta, weight, mask):
            if sums.variables[0] is self.variables[0]:
                grads = tf.einsum("nld,knlu->kndu", sums.rows, sums.deltas)
                out[self.key] = (tf.einsum("kn,kndu->du", weight, tf.square(grads)) * self.trace,)
        return out

    def finish(self, means, first):
        return first, means[0]


class _TwoPass(Kronecker):
    kind = "twopass"
    passes = 2

    def second_pass(self):
        return _Moments(self)

    @classmethod
    def assemble(cls, blocks, parts, variables):
        return parts


def _mlp():
    keras.utils.set_random_seed(3)
    return keras.Sequential([keras.Input((5,)), keras.layers.Dense(4, activation="tanh", name="d1"),
                             keras.layers.Dense(3, name="d2")])


def _oracle(model, x, y):
    """``[(A, G, E_n[ḡ_n²] · tr(G))]`` per layer, float64, one example at a time (manual
    backprop of the cross-entropy, the true label)."""
    (w1, b1), (w2, b2) = [[np.float64(v.numpy()) for v in layer.weights] for layer in model.layers]
    rows, deltas = {0: [], 1: []}, {0: [], 1: []}
    for xn, yn in zip(np.float64(x), y):
        h = np.tanh(xn @ w1 + b1)
        z = h @ w2 + b2
        p = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
        d2 = p - np.eye(3)[yn]
        d1 = (w2 @ d2) * (1 - h ** 2)
        for i, (a, d) in enumerate(((xn, d1), (h, d2))):
            rows[i].append(np.append(a, 1.0))
            deltas[i].append(d)
    out = []
    for i in (0, 1):
        r, d = np.array(rows[i]), np.array(deltas[i])
        a, g = r.T @ r / len(r), d.T @ d / len(r)
        moments = np.mean([np.outer(rn, dn) ** 2 for rn, dn in zip(r, d)], axis=0) * np.trace(g)
        out.append((a, g, moments))
    return out


def test_a_two_pass_kind_gets_a_second_pass_with_its_first_estimate(monkeypatch):
    """A kind with passes = 2: the estimator runs the data again (3 rows a call: padding
    rows in the last batch), its second-pass blocks given the first pass's parts, their
    sums from the rule's per-example rows; a second call on new data reuses the compiled
    passes (no retrace) and gives that data's values."""
    monkeypatch.setitem(blocks.KINDS, "twopass", _TwoPass)
    model = _mlp()
    estimator = fastewc.FisherEstimator(model, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                                        kind="empirical", curvature="twopass", batch_size=3, jit_compile=False)
    for seed in (0, 1):
        rng = np.random.default_rng(seed)
        x, y = rng.normal(size=(7, 5)).astype(np.float32), rng.integers(0, 3, size=7)
        parts = estimator((x, y))
        if seed == 0:
            traces = estimator.tracing_count()
        assert [type(p) for p in parts] == [tuple, tuple]
        for (first, moments), (a, g, reference) in zip(parts, _oracle(model, x, y)):
            np.testing.assert_allclose(first.a, a, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(first.g, g, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(moments, reference, rtol=1e-4, atol=1e-7)
    assert estimator.tracing_count() == traces
