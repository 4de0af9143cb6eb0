"""The demo (`python -m fastewc demo`): the --quick run's outputs, its claim (EWC forgets
less than fine-tuning), the metrics' definitions and bad options; the --curvature kfac run
(KFAC-EWC next to the diagonal EWC), the validation split and the curvature comparison
(`python -m fastewc.demo.compare_curvature`)."""
import contextlib
import glob
import io
import json
import os

import numpy as np
import pytest

from fastewc.__main__ import main
from fastewc.demo import metrics

METHODS = ("finetune", "ewc_separate", "ewc_online")
KFAC_METHODS = ("kfac_separate", "kfac_online")


# -- metrics (hand-computed) ---------------------------------------------------------------
def test_metrics_on_a_hand_matrix():
    acc = np.array([[0.9, 0.1, 0.0],
                    [0.6, 0.8, 0.2],
                    [0.5, 0.7, 1.0]])
    assert metrics.average_accuracy(acc) == pytest.approx((0.5 + 0.7 + 1.0) / 3)
    # task 1: best before last 0.9, final 0.5; task 2: best 0.8, final 0.7
    assert metrics.average_forgetting(acc) == pytest.approx(((0.9 - 0.5) + (0.8 - 0.7)) / 2)
    assert metrics.learning_accuracy(acc) == pytest.approx((0.9 + 0.8 + 1.0) / 3)


def test_forgetting_can_be_negative_and_needs_a_square_matrix():
    acc = np.array([[0.5, 0.0], [0.7, 0.9]])     # task 1 improved: backward transfer
    assert metrics.average_forgetting(acc) == pytest.approx(-0.2)
    with pytest.raises(ValueError, match="square"):
        metrics.average_forgetting(np.zeros((2, 3)))


# -- the --quick run -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(["demo", "--quick", "--out", str(out), "--seed", "0"])
    return code, out, printed.getvalue()


def test_quick_run_writes_its_files(quick_run):
    code, out, _ = quick_run
    assert code == 0
    assert os.path.isfile(out / "results.json")
    png = out / "accuracy.png"
    assert os.path.isfile(png)
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    for method in METHODS:   # one TensorBoard event file per method
        assert glob.glob(str(out / "tensorboard" / method / "events.out.tfevents.*")), method


def test_quick_results_json_structure(quick_run):
    _, out, _ = quick_run
    with open(out / "results.json", encoding="utf-8") as f:
        results = json.load(f)
    assert results["methods"] == list(METHODS)
    T = results["scenario"]["num_tasks"]
    assert T == 3 and results["scenario"]["name"] == "permuted"
    assert "head" in results["scenario"]
    assert results["config"]["quick"] is True and results["config"]["kind"] == "exact"
    for method in METHODS:
        r = results[method]
        acc = np.asarray(r["accuracy_matrix"])
        assert acc.shape == (T, T)
        assert np.all((acc >= 0) & (acc <= 1))
        assert 0.0 <= r["average_accuracy"] <= 1.0
        assert r["average_accuracy"] == pytest.approx(metrics.average_accuracy(acc))
        assert r["average_forgetting"] == pytest.approx(metrics.average_forgetting(acc))
        assert -1.0 <= r["average_forgetting"] <= 1.0
        assert len(r["epoch_losses"]) == T
        assert r["timings"]["train_seconds"] > 0
        assert len(r["timings"]["train_seconds_per_task"]) == T
    assert results["finetune"]["timings"]["fisher_seconds"] == 0
    for method in ("ewc_separate", "ewc_online"):
        assert results[method]["ewc"]["num_tasks"] == T
        assert len(results[method]["timings"]["fisher_seconds_per_task"]) == T
    s = results["fisher_speedup"]
    assert s["kind"] == "exact" and s["examples"] == 16
    assert s["auto_seconds"] > 0 and s["loop_seconds"] > 0
    assert s["speedup"] == pytest.approx(s["loop_seconds"] / s["auto_seconds"])
    assert s["max_relative_difference"] < 1e-4       # the fast path equals the eager loop
    assert results["timings"]["total_seconds"] > 0


def test_quick_ewc_forgets_less_than_finetuning(quick_run):
    _, out, _ = quick_run
    with open(out / "results.json", encoding="utf-8") as f:
        results = json.load(f)
    fine = results["finetune"]
    assert fine["average_forgetting"] > 0.1          # fine-tuning really forgets
    for method in ("ewc_separate", "ewc_online"):
        assert results[method]["average_forgetting"] < fine["average_forgetting"], method
        assert results[method]["average_accuracy"] > fine["average_accuracy"], method


def test_quick_run_prints_progress_and_tables(quick_run):
    _, _, printed = quick_run
    for method in METHODS:                       # a progress line per task and method
        for t in (1, 2, 3):
            assert f"[{method:<12}] task {t}/3" in printed
        assert f"Accuracy matrix, {method}" in printed
    assert "Fisher speed-up (exact, 16 examples" in printed
    assert "results.json" in printed and "accuracy.png" in printed


# -- bad options ---------------------------------------------------------------------------
@pytest.mark.parametrize("argv, option", [
    (["demo", "--tasks", "1"], "--tasks"),
    (["demo", "--tasks", "two"], "--tasks"),
    (["demo", "--lam", "-1"], "--lam"),
    (["demo", "--lam", "nan"], "--lam"),
    (["demo", "--epochs", "0"], "--epochs"),
    (["demo", "--scenario", "rotated"], "--scenario"),
    (["demo", "--kind", "batched"], "--kind"),
    (["demo", "--seed", "-3"], "--seed"),
    (["demo", "--gamma", "1.5"], "--gamma"),
    (["demo", "--scenario", "split", "--tasks", "6"], "--tasks"),
    (["demo", "--no-such-option"], "--no-such-option"),
    (["demo", "--curvature", "full"], "--curvature"),
    (["demo", "--curvature", "kfac", "--kfac-lam", "-1"], "--kfac-lam"),
    (["demo", "--curvature", "kfac", "--damping", "nan"], "--damping"),
    (["demo", "--curvature", "kfac", "--damping", "-0.1"], "--damping"),
    (["demo", "--curvature", "kfac", "--kfac-sum", "approx"], "--kfac-sum"),
    # KFAC-only options without --curvature kfac: an error, not silently ignored
    (["demo", "--damping", "0.1"], "--damping"),
    (["demo", "--kfac-sum", "nearest"], "--kfac-sum"),
    (["demo", "--curvature", "diagonal", "--kfac-lam", "10"], "--kfac-lam"),
    (["demo", "--curvature", "ekfac", "--kfac-sum", "nearest"], "--kfac-sum"),  # EKFAC has one online sum
])
def test_bad_option_exits_nonzero_and_names_it(argv, option, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code != 0
    err = capsys.readouterr().err
    assert option in err


def test_ekfac_takes_its_own_lambda_from_the_command_line(monkeypatch):
    """--kfac-lam is the λ of every non-diagonal kind (DemoConfig.lam_of), EKFAC's too."""
    from fastewc.demo import run
    seen = []
    monkeypatch.setattr(run, "run_demo", lambda config, log=None: seen.append(config) or {})
    main(["demo", "--quick", "--curvature", "ekfac", "--kfac-lam", "30"])
    assert seen[0].curvature == "ekfac" and seen[0].lam_of("ekfac_separate") == 30


def test_out_must_not_be_a_file(tmp_path, capsys):
    path = tmp_path / "a_file"
    path.write_text("x")
    with pytest.raises(SystemExit) as info:
        main(["demo", "--quick", "--out", str(path)])
    assert info.value.code != 0
    assert "--out" in capsys.readouterr().err


def test_no_command_is_an_error(capsys):
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code != 0


def test_run_demo_checks_its_config():
    from fastewc.demo import DemoConfig, run_demo
    with pytest.raises(ValueError, match="`tasks` must be an integer >= 2"):
        run_demo(DemoConfig(tasks=1))
    with pytest.raises(ValueError, match="`kind`"):
        run_demo(DemoConfig(kind="batched"))
    with pytest.raises(ValueError, match="`curvature`"):
        run_demo(DemoConfig(curvature="full"))
    with pytest.raises(ValueError, match="`kfac_sum`"):
        run_demo(DemoConfig(curvature="kfac", kfac_sum="approx"))
    with pytest.raises(ValueError, match="`damping` must be a finite number >= 0"):
        run_demo(DemoConfig(curvature="kfac", damping=-1.0))
    with pytest.raises(ValueError, match="apply to curvature='kfac' only"):
        run_demo(DemoConfig(damping=0.1))


# -- --curvature kfac ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def kfac_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "kfac"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(["demo", "--quick", "--out", str(out), "--seed", "0", "--curvature", "kfac",
                     "--kfac-sum", "nearest", "--damping", "1e-3"])
    with open(out / "results.json", encoding="utf-8") as f:
        results = json.load(f)
    return code, out, printed.getvalue(), results


def test_kfac_run_adds_both_kfac_methods_to_every_output(kfac_run):
    code, out, printed, results = kfac_run
    assert code == 0
    assert results["methods"] == list(METHODS + KFAC_METHODS)
    cfg = results["config"]
    assert cfg["curvature"] == "kfac" and cfg["kfac_sum"] == "nearest" and cfg["damping"] == 1e-3
    assert cfg["kfac_lam"] > 0
    with open(out / "accuracy.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    for method in METHODS + KFAC_METHODS:
        assert glob.glob(str(out / "tensorboard" / method / "events.out.tfevents.*")), method
        assert f"Accuracy matrix, {method}" in printed
        for t in (1, 2, 3):
            assert f"[{method:<13}] task {t}/3" in printed
        assert f"\n{method} " in printed                # a row of the summary table
    assert "KFAC-EWC: lam=" in printed and "kfac_sum='nearest'" in printed


def test_kfac_methods_state(kfac_run):
    *_, results = kfac_run
    T = results["scenario"]["num_tasks"]
    for method, terms in (("kfac_separate", T), ("kfac_online", 1)):    # nearest: one term
        ewc = results[method]["ewc"]
        assert ewc["curvature"] == "kfac" and ewc["lam"] == results["config"]["kfac_lam"]
        assert ewc["damping"] == 1e-3 and ewc["num_tasks"] == T
        assert ewc["mode"] == method.split("_")[1]
        assert ewc["kfac_sum"] == ("nearest" if method == "kfac_online" else "exact")
        assert ewc["kronecker_blocks"] == 3                      # the MLP's three Dense layers
        assert ewc["kronecker_terms_per_block"] == terms
        assert len(results[method]["timings"]["fisher_seconds_per_task"]) == T
    for method in ("ewc_separate", "ewc_online"):
        assert results[method]["ewc"]["curvature"] == "diagonal"


def test_kfac_forgets_less_than_finetuning(kfac_run):
    *_, results = kfac_run
    fine = results["finetune"]
    for method in KFAC_METHODS:
        r = results[method]
        assert r["average_forgetting"] < fine["average_forgetting"], method
        assert r["average_accuracy"] > fine["average_accuracy"], method
        assert np.asarray(r["accuracy_matrix"]).shape == (3, 3)


def test_kfac_run_leaves_the_other_methods_unchanged(quick_run, kfac_run):
    """Same seed, same batches: the diagonal methods' accuracy matrices and losses are those
    of the default run (the KFAC methods only come after them)."""
    _, out, _ = quick_run
    with open(out / "results.json", encoding="utf-8") as f:
        default = json.load(f)
    *_, results = kfac_run
    for method in METHODS:
        assert results[method]["accuracy_matrix"] == default[method]["accuracy_matrix"], method
        assert results[method]["epoch_losses"] == default[method]["epoch_losses"], method
    assert results["fisher_speedup"]["max_relative_difference"] < 1e-4


# -- the validation split and compare_curvature ----------------------------------------------
def test_with_validation_holds_out_part_of_the_training_split():
    from fastewc.demo import scenarios
    base = scenarios.load_scenario("permuted", 3, seed=0)
    held = scenarios.with_validation(base, 0.2, seed=0)
    for b, h in zip(base.tasks, held.tasks):
        n = len(b.y_train)
        assert len(h.y_val) == -(-n // 5) and len(h.y_train) + len(h.y_val) == n   # ceil(n/5)
        np.testing.assert_array_equal(h.x_test, b.x_test)            # test split untouched
        rows = {r.tobytes() for r in b.x_train}
        assert all(r.tobytes() in rows for r in h.x_val)             # carved from train ...
        assert not {r.tobytes() for r in h.x_val} & {r.tobytes() for r in h.x_train}  # ... apart
        assert np.bincount(h.y_val, minlength=10).min() > 0          # stratified
    # permuted tasks share their images: the same examples are held out in every task
    # (a pixel permutation keeps each image's sorted pixel values)
    for task in held.tasks[1:]:
        np.testing.assert_array_equal(np.sort(task.x_val, axis=1), np.sort(held.tasks[0].x_val, axis=1))
        np.testing.assert_array_equal(task.y_val, held.tasks[0].y_val)
    with pytest.raises(ValueError, match="`fraction`"):
        scenarios.with_validation(base, 1.5, seed=0)


def test_selection_uses_validation_only():
    from fastewc.demo import compare_curvature as cc

    def record(val, test):
        return {"val_average_accuracy": val, "test_average_accuracy": test,
                "test_average_forgetting": 0.0, "test_learning_accuracy": 0.9,
                "train_seconds": 1.0, "wall_seconds": 1.0, "test_accuracy_matrix": [[val]]}

    runs = {}
    for seed in (0, 1):
        runs[cc._key(4, "finetune", None, seed)] = record(0.5, 0.5)
        # λ=10 has the best TEST accuracy, λ=100 the best validation accuracy
        for lam, val, test in ((10.0, 0.6, 0.99), (100.0, 0.7 + 0.01 * seed, 0.6), (1000.0, 0.7, 0.6)):
            runs[cc._key(4, "ewc_online", lam, seed)] = record(val, test)
    sel = cc.select(runs, (4,), ("finetune", "ewc_online"), (10.0, 100.0, 1000.0), (0, 1))["4"]
    assert sel["ewc_online"]["lam"] == 100.0 and not sel["ewc_online"]["lam_at_grid_edge"]
    assert sel["ewc_online"]["test_average_accuracy"]["mean"] == pytest.approx(0.6)
    assert sel["finetune"]["lam"] is None
    table = cc.markdown_table({"4": sel}, (4,), ("finetune", "ewc_online"), cc.LABELS)
    assert "| diagonal EWC (online) | 100 | 60.0 ± 0.0 |" in table


def test_compare_curvature_smoke(tmp_path, capsys):
    from fastewc.demo import compare_curvature as cc
    out = tmp_path / "cc"
    results = cc.main(["--tasks", "2", "--seeds", "0", "--grid", "30,300", "--epochs", "1",
                       "--methods", "finetune,kfac_online",
                       "--json", str(out / "r.json"), "--cache", str(out / "runs.jsonl")])
    printed = capsys.readouterr().out
    with open(out / "r.json", encoding="utf-8") as f:
        assert json.load(f)["results"].keys() == {"2"}
    with open(out / "accuracy.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert "| KFAC-EWC (online, nearest sum) |" in printed
    assert results["timings"]["runs"] == 3 and results["timings"]["runs_from_cache"] == 0
    for r in results["runs"]:
        assert 0 <= r["val_average_accuracy"] <= 1 and 0 <= r["test_average_accuracy"] <= 1
    again = cc.main(["--tasks", "2", "--seeds", "0", "--grid", "30,300", "--epochs", "1",
                     "--methods", "finetune,kfac_online", "--resume",
                     "--json", str(out / "r2.json"), "--cache", str(out / "runs.jsonl")])
    assert again["timings"]["runs_from_cache"] == 3
    assert again["results"] == results["results"]


@pytest.mark.parametrize("argv, option", [
    (["--grid", "0,10"], "--grid"),
    (["--tasks", "1"], "--tasks"),
    (["--methods", "ewc_diag"], "--methods"),
    (["--kfac-sum", "approx"], "--kfac-sum"),
    (["--val-fraction", "1"], "--val-fraction"),
])
def test_compare_curvature_bad_option(argv, option, capsys):
    from fastewc.demo import compare_curvature as cc
    with pytest.raises(SystemExit) as info:
        cc.main(argv)
    assert info.value.code != 0
    assert option in capsys.readouterr().err


def test_penalty_shape_measures_each_dense_block():
    """The README's measurement (fastewc.demo.penalty_shape), with 1 epoch per task: same
    trace for both approximations, a stiffer Kronecker form on the drift a new task makes."""
    from fastewc.demo import penalty_shape
    out = penalty_shape.measure(seed=0, epochs=1, log=lambda line: None)
    assert len(out["layers"]) == 3                        # the MLP's three Dense layers
    total = out["total"]
    assert 0.8 < total["trace_kfac"] / total["trace_diag"] < 1.25
    assert total["q_kfac"] > 3 * total["q_diag"]
    for row in out["layers"]:
        assert row["a_top_over_mean_diag"] > 10         # A = E[āāᵀ] is uncentred


def test_the_demo_copies_of_the_library_choices_agree():
    """The demo keeps its own CURVATURES and KFAC_SUMS (no TensorFlow import for --help)."""
    from fastewc.curvature import CURVATURES
    from fastewc.demo import run
    from fastewc.kfac_penalty import KFAC_SUMS
    assert run.CURVATURES == CURVATURES and run.KFAC_SUMS == KFAC_SUMS
