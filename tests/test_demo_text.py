"""The demo's text scenario (`python -m fastewc demo --scenario text`): the byte-token data
pipeline against hand-built references, perplexity against a float64 NumPy computation,
the validation-only choice of λ, and one --quick run's outputs (not whether EWC helps:
that depends on the run)."""
import contextlib
import io
import json
import math
import os

import numpy as np
import pytest

from fastewc.__main__ import main
from fastewc.demo import text, text_data as td

pytest.importorskip("keras_hub")


# -- data ------------------------------------------------------------------------------------
def _reference_windows(stream, T):
    """Window w: inputs stream[wT:(w+1)T], targets one later; PAD and mask 0 past the end."""
    predictions = len(stream) - 1
    rows = []
    for w in range(-(-predictions // T)):
        inp, tgt, msk = [], [], []
        for j in range(T):
            k = w * T + j
            real = k < predictions
            inp.append(int(stream[k]) if real else td.PAD)
            tgt.append(int(stream[k + 1]) if real else td.PAD)
            msk.append(int(real))
        rows.append((inp, tgt, msk))
    return [np.array([r[i] for r in rows]) for i in range(3)]


@pytest.mark.parametrize("length, T", [(2, 4), (9, 4), (13, 4), (17, 8)])
def test_windows_against_a_loop(length, T):
    stream = np.random.default_rng(length).integers(0, 257, length).astype(np.int32)
    got = td.windows(stream, T)
    for a, b in zip(got, _reference_windows(stream, T)):
        np.testing.assert_array_equal(a, b)
    inputs, targets, mask = got
    # every next-token prediction exactly once, in order; the mask covers exactly the padding
    np.testing.assert_array_equal(targets[mask == 1], stream[1:])
    np.testing.assert_array_equal(inputs[mask == 1], stream[:-1])
    assert np.all(targets[mask == 0] == td.PAD) and np.all(inputs[mask == 0] == td.PAD)
    assert mask.sum() == length - 1
    with pytest.raises(ValueError, match="at least 2 tokens"):
        td.windows(stream[:1], T)


def test_bytes_round_trip_to_the_text():
    sample = "Größe → naïve 'λ' — ok\n"
    ids = td.encode(sample)
    assert ids.dtype == np.int32 and ids.max() < 256
    assert list(ids) == list(sample.encode("utf-8"))
    assert td.decode(np.concatenate([ids, [td.EOS, td.PAD]])) == sample


def test_split_rule_by_index():
    assert [td.split_of(i) for i in range(12)] == (
        ["train"] * 3 + ["val"] + ["train"] * 3 + ["test"] + ["train"] * 2 + ["train", "train"])


@pytest.fixture(scope="module")
def tasks():
    return td.load_tasks(32, {"train": 60_000, "val": 20_000, "test": 20_000})


def test_tasks_are_deterministic_and_split_by_document(tasks):
    again = td.load_tasks(32, {"train": 60_000, "val": 20_000, "test": 20_000})
    originals = [dict(td.doc_documents()), dict(td.code_documents())]
    for task, twin, docs in zip(tasks, again, originals):
        names = {s: task.split(s).documents for s in td.SPLITS}
        for s in td.SPLITS:
            np.testing.assert_array_equal(task.split(s).inputs, twin.split(s).inputs)
            np.testing.assert_array_equal(task.split(s).mask, twin.split(s).mask)
            assert names[s], s
        assert not set(names["train"]) & set(names["val"])
        assert not set(names["train"]) & set(names["test"])
        assert not set(names["val"]) & set(names["test"])
        order = sorted(docs)
        for s in td.SPLITS:
            assert all(td.split_of(order.index(n)) == s for n in names[s])
            assert list(names[s]) == sorted(names[s])
        # the stream decodes back to the documents, each ended by EOS (the last one may be
        # cut at the byte budget)
        split = task.train
        stream = np.concatenate([split.inputs[0, :1], split.targets[split.mask == 1]])
        pieces = bytes(np.where(stream == td.EOS, 0, stream).astype(np.uint8)).split(b"\0")
        for name, piece in zip(split.documents, pieces):
            original = docs[name]
            original = original.encode("utf-8") if isinstance(original, str) else original
            assert original.startswith(piece) and len(piece) > 0, name
        assert bytes(pieces[0]) == (docs[split.documents[0]].encode("utf-8")
                                    if isinstance(docs[split.documents[0]], str)
                                    else docs[split.documents[0]])
        assert split.num_bytes == 60_000 and int(split.mask.sum()) == 60_000 + len(split.documents) - 1


# -- perplexity ----------------------------------------------------------------------------
def test_perplexity_against_float64_numpy():
    import keras
    keras.utils.set_random_seed(3)
    config = text.TextConfig(quick=True, out="unused").resolved()
    model = text.build_model(config)
    T = config.seq_len
    stream = np.random.default_rng(4).integers(0, 257, 5 * T - 6).astype(np.int32)
    inputs, targets, mask = td.windows(stream, T)                  # 5 windows, the last partial
    split = td.Split(inputs, targets, mask, ("a",), len(stream))
    total, count = 0.0, 0
    for w in range(len(inputs)):                                   # one window at a time
        x = {"token_ids": inputs[w:w + 1], "padding_mask": mask[w:w + 1]}
        logits = np.asarray(model(x, training=False), np.float64)[0]
        top = logits.max(-1, keepdims=True)
        logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
        for j in range(T):
            if mask[w, j]:
                total -= logp[j, targets[w, j]]
                count += 1
    assert count == len(stream) - 1
    ppl, mean = text.perplexity(model, split, batch_size=2)        # 3 batches, the last padded
    assert mean == pytest.approx(total / count, rel=1e-5)
    assert ppl == pytest.approx(math.exp(total / count), rel=1e-5)


def test_lambda_is_chosen_on_validation_only():
    runs = [{"lam": 1.0, "val_criterion": 9.0, "perplexity": {"test": [1.0, 1.0]}},
            {"lam": 10.0, "val_criterion": 7.5, "perplexity": {"test": [50.0, 50.0]}},
            {"lam": 100.0, "val_criterion": 7.5, "perplexity": {"test": [40.0, 40.0]}}]
    assert text.choose(runs) == 1                   # lowest validation criterion; ties: smaller λ
    assert text.val_criterion([4.0, 9.0]) == pytest.approx(6.0)    # geometric mean


# -- the --quick run -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def quick_text_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "text"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(["demo", "--scenario", "text", "--quick", "--out", str(out)])
    with open(out / "results.json", encoding="utf-8") as f:
        results = json.load(f)
    return code, out, printed.getvalue(), results


def test_quick_text_run_outputs(quick_text_run):
    code, out, printed, results = quick_text_run
    assert code == 0
    with open(out / "perplexity.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert results["methods"] == ["finetune", "ewc", "kfac"]
    assert [t["name"] for t in results["tasks"]] == ["docs", "code"]
    for key in ("val", "test"):
        assert len(results["stage1"]["perplexity"][key]) == 2
        assert all(1 < p < td.VOCAB * 2 for p in results["stage1"]["perplexity"][key])
    config = results["config"]
    for method in ("finetune", "ewc", "kfac"):
        r = results[method]
        assert r["available"], r.get("reason")    # every method runs on the GPT2CausalLM
        grid = {"finetune": [None], "ewc": config["lam_grid"], "kfac": config["kfac_lam_grid"]}[method]
        assert [run["lam"] for run in r["runs"]] == grid
        assert r["lam"] in grid and r["chosen"] == r["runs"][text.choose(r["runs"])]
        for run in r["runs"]:
            assert run["val_criterion"] == pytest.approx(math.exp(np.mean(np.log(run["perplexity"]["val"]))))
            assert run["train_seconds"] > 0 and len(run["losses"]) == config["steps"] // config["steps_per_call"]
        assert f"\n{method:<14}" in printed           # a row of the test-perplexity table
    assert results["ewc"]["ewc"] == {"mode": "separate", "curvature": "diagonal", "num_tasks": 1}
    # KFAC runs on the model with its tied ReversibleEmbedding: Kronecker blocks for the MLP
    # Dense layers and the attention's query, key, value and output EinsumDense, the diagonal
    # for the embedding and norms
    assert results["kfac"]["ewc"]["curvature"] == "kfac" and results["kfac"]["ewc"]["kronecker_blocks"] == 6 * config["num_layers"]
    for method in ("ewc", "kfac"):
        c = results["consolidation"][method]
        # factored, no fallback: no error and no warning (e.g. "method='auto' uses 'vmap'")
        assert c["seconds"] >= 0 and c["error"] is None and c["warnings"] == []
        assert "NOT AVAILABLE" not in printed and "note (" not in printed
    assert "Test perplexity" in printed and "results.json" in printed
    assert results["timings"]["total_seconds"] > 0


@pytest.mark.parametrize("argv, option", [
    (["--lam", "10"], "--lam"), (["--curvature", "kfac"], "--curvature"), (["--tasks", "3"], "--tasks"),
    (["--gamma", "0.5"], "--gamma")])
def test_text_rejects_the_digit_options(argv, option, capsys):
    with pytest.raises(SystemExit) as info:
        main(["demo", "--scenario", "text", "--quick"] + argv)
    assert info.value.code != 0
    err = capsys.readouterr().err
    assert option in err and "digit scenarios only" in err
