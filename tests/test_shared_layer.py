"""A model with a shared layer (one layer called twice per forward pass), issue 26 item 5:
the diagonal Fisher's error advises method='vmap' and that works; curvature='kfac' cannot
take such a layer and says so, advising curvature='diagonal' (not method='vmap', which KFAC
refuses)."""
import keras
import numpy as np
import pytest

import fastewc
from fastewc.capture import SharedLayerError
from fastewc.testing import reference_fisher_of

from conftest import assert_close

LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
KFAC_ADVICE = (r"Layer 'shared' \(Dense\) is called more than once in one forward pass \(a shared "
               r"layer\)\. curvature='kfac' cannot take a shared layer.*Use curvature='diagonal'")


def shared_model():
    keras.utils.set_random_seed(3)
    inp = keras.Input((4,))
    shared = keras.layers.Dense(4, activation="tanh", name="shared")
    return keras.Model(inp, keras.layers.Dense(3, name="out")(shared(shared(inp))))


def task(n=6):
    rng = np.random.default_rng(0)
    return rng.normal(size=(n, 4)).astype(np.float32), np.arange(n) % 3


@pytest.mark.parametrize("entry", ["kfac_fisher", "estimator", "consolidate"])
def test_kfac_shared_layer_advises_diagonal(entry):
    model = shared_model()
    data = task()
    calls = {
        "kfac_fisher": lambda: fastewc.kfac_fisher(model, data, loss=LOSS),
        "estimator": lambda: fastewc.FisherEstimator(model, loss=LOSS, curvature="kfac")(data),
        "consolidate": lambda: fastewc.EWC(model, lam=1.0, curvature="kfac").consolidate(data, loss=LOSS),
    }
    with pytest.raises(SharedLayerError, match=KFAC_ADVICE) as info:
        calls[entry]()
    assert "method='vmap'" not in str(info.value)       # KFAC refuses any method but auto/factored


def test_kfac_advice_works_and_diagonal_advice_is_unchanged():
    """curvature='diagonal' (the KFAC error's advice) consolidates the model; its factored
    Fisher still advises method='vmap', which gives the float64 reference Fisher."""
    model = shared_model()
    x, y = task()
    expected = reference_fisher_of(model, x, y, loss=LOSS, kind="exact")
    with pytest.raises(SharedLayerError, match=r"called more than once.*The factored rules do not "
                                               r"support shared layers yet: use method='vmap'"):
        fastewc.fisher_diagonal(model, (x, y), loss=LOSS, kind="exact", method="factored")
    for f, r in zip(fastewc.fisher_diagonal(model, (x, y), loss=LOSS, kind="exact", method="vmap"), expected):
        assert_close(f, r)
    ewc = fastewc.EWC(model, lam=1.0)
    with pytest.warns(UserWarning, match="uses 'vmap'"):
        fisher = ewc.consolidate((x, y), loss=LOSS, kind="exact")
    for f, r in zip(fisher, expected):
        assert_close(f, r)
    assert ewc.num_tasks == 1
