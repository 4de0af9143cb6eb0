"""The demo (`python -m fastewc demo`): the --quick run's outputs, its claim (EWC forgets
less than fine-tuning), the metrics' definitions and bad options."""
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
])
def test_bad_option_exits_nonzero_and_names_it(argv, option, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code != 0
    err = capsys.readouterr().err
    assert option in err


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
