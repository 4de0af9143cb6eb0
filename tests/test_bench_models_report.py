"""benchmarks/report_models.py: the Markdown table of a bench_models.py run (no TF)."""
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import report_models  # noqa: E402


def _steady(model, *, medians, first, plans, errors=None, examples=64, params=2_300_000):
    return {"name": f"test_model[CPU:0-{model}]", "group": f"models-{model}[CPU:0]", "stats": {"median": 1.0},
            "extra_info": {"role": "models", "model": model, "examples": examples, "params": params,
                           "medians": medians, "first_call_s": first, "plans": plans, "errors": errors or {},
                           "rounds": 7, "first_call_peak_bytes": {"floor_xla": 2**20 * 300, "exact": 2**20 * 512}}}


def _loop(model, per_example):
    return {"name": f"test_loop[CPU:0-{model}]", "group": f"models-{model}[CPU:0]",
            "stats": {"median": 4 * per_example},
            "extra_info": {"role": "models-loop", "model": model, "examples": 4, "kind": "empirical",
                           "per_example_s": per_example}}


def _fidelity(model, records, replaced=None):
    info = {"role": "models-fidelity", "model": model, "examples": 4, "bound": 1e-4, "zero_floor": 1e-7,
            "fidelity": records}
    if replaced:
        info["replaced"] = replaced
    return {"name": f"test_fidelity[CPU:0-{model}]", "group": f"models-{model}[CPU:0]", "stats": {"median": 9.0},
            "extra_info": info}


def _record(error, zero_error=0.0, reference="float64", reason=None, bound=None):
    record = {"method": "factored", "error": error, "zero_error": zero_error, "reference": reference,
              "worst": [["dense/kernel", error]]}
    if bound is not None:
        record["bound"] = bound
    if reason:
        record["reason"] = reason
    return record


def _doc():
    factored = {"empirical": {"method": "factored", "K": 1, "rows": 256, "jit_compile": False},
                "exact": {"method": "factored", "K": 9, "rows": 64, "jit_compile": False}}
    return {"datetime": "2026-12-01T00:00:00", "machine_info": {"cpu": {"count": 2}, "python_version": "3.11"},
            "benchmarks": [
                # XLA floor 0.10 s is the faster: empirical 0.15 → 1.50×, exact 0.45 → 4.50×
                _steady("mobilenet_v2", examples=64,
                        medians={"floor_xla": 0.10, "floor_noxla": 0.20, "empirical": 0.15, "exact": 0.45},
                        first={"floor_xla": 12.0, "floor_noxla": 3.0, "empirical": 5.0, "exact": 0.5},
                        plans=factored),
                # the exact kind failed; auto picked vmap; the noxla floor is the faster
                _steady("bert", examples=32, params=140_106,
                        medians={"floor_xla": 0.05, "floor_noxla": 0.04, "empirical": 0.40},
                        first={"floor_xla": 4.0, "floor_noxla": 1.2, "empirical": 9.5},
                        plans={"empirical": {"method": "vmap", "K": 1, "rows": 32, "jit_compile": True}},
                        errors={"exact": "ValueError: No pfor vectorization defined for XlaDynamicUpdateSlice"}),
                _loop("mobilenet_v2", 0.25),   # 0.25 s × 64 examples / 0.10 s = 160×
                # sampled replaced exact (the exact oracle too slow)
                _fidelity("mobilenet_v2", {"empirical": _record(2.1e-06), "sampled": _record(3.44e-06)},
                          replaced={"exact": "sampled", "reason": "the exact float64 oracle would take ~90 s"}),
                # empirical beyond the bound (near-zero variables); exact held to the float32 limit
                _fidelity("bert", {"empirical": _record(8.5e-07, zero_error=3e-7),
                                   "exact": _record(5.2e-03, reference="float32 limit", bound=6.0e-03, reason="float32 itself is 3.0e-03")}),
                {"name": "test_floor[CPU:0-mlp-xla]", "group": "mlp-fisher[CPU:0]", "stats": {"median": 0.01},
                 "extra_info": {"role": "floor", "problem": "mlp"}},          # another suite: ignored
            ]}


def test_model_table_rows():
    text = report_models.render(_doc())
    assert ("| model | auto picks | K | empirical × floor | exact × floor | loop × floor (per example) "
            "| first call: floor → empirical / exact | params | max rel. err vs float64 (empirical / exact) |") in text
    assert ("| mobilenet_v2 | factored (256 / 64 rows) | 9 | 1.50× | 4.50× | 160× "
            "| 12.0 s (xla) → 5.0 s / 0.50 s | 2.3 M | 2.1e-06 / 3.4e-06 (sampled) |") in text
    assert ("| bert | vmap (32 rows) | – | 10.00× | **ValueError** | – "
            "| 1.2 s (noxla) → 9.5 s / **ValueError** | 140 k | **8.5e-07** / 5.2e-03 (float32 limit) |") in text
    assert "- mobilenet_v2: sampled instead of exact: the exact float64 oracle would take ~90 s" in text
    assert "- bert / exact: float32 limit: float32 itself is 3.0e-03" in text
    assert "mlp" not in text
    assert "- bert / exact: `ValueError: No pfor vectorization defined for XlaDynamicUpdateSlice`" in text


def test_detail_table_and_main(tmp_path, capsys):
    path = tmp_path / "models.json"
    path.write_text(json.dumps(_doc()))
    assert report_models.main([str(path)]) == 0
    out = capsys.readouterr().out
    assert ("| mobilenet_v2 | 64 | 100.0 ms / 200.0 ms | 150.0 ms | 450.0 ms | 250.0 ms | 7 "
            "| 300 / – / – / 512 |") in out
    assert "| bert | 32 | 50.0 ms / 40.0 ms | 400.0 ms | **ValueError** | – | 7 |" in out


def test_empty_run_renders_headers_only():
    text = report_models.render({"benchmarks": []})
    assert "| model | auto picks |" in text and "Failed" not in text and "Fidelity notes" not in text


def test_fidelity_only_run():
    """A ``-k fidelity`` run: the fidelity column filled, the timing cells empty."""
    doc = {"benchmarks": [_fidelity("lstm", {"empirical": _record(1.234e-06), "exact": _record(2e-4)})]}
    text = report_models.render(doc)
    assert "| lstm | – | – | – | – | – | – | – | 1.2e-06 / **2.0e-04** |" in text


def test_before_after_table_normalises_each_run_by_its_own_floor(tmp_path, capsys):
    """Before: mobilenet_v2 as in _doc() (1.50× / 4.50×; first calls 5.0 and 0.5 s over the
    faster floor's 12.0 s).  After: a floor twice as slow, the kinds 1.2× and 3.0× of it."""
    after = {"benchmarks": [_steady(
        "mobilenet_v2", medians={"floor_xla": 0.20, "floor_noxla": 0.30, "empirical": 0.24, "exact": 0.60},
        first={"floor_xla": 2.0, "floor_noxla": 1.0, "empirical": 3.0, "exact": 5.0},
        plans={})]}
    text = report_models.comparison_table(_doc(), after)
    assert "| mobilenet_v2 | 1.50× → 1.20× | 4.50× → 3.00× | 0.42× → 1.50× | 0.04× → 2.50× |" in text
    assert "bert" not in text                                     # not in the after run
    before_path, after_path = tmp_path / "before.json", tmp_path / "after.json"
    before_path.write_text(json.dumps(_doc()))
    after_path.write_text(json.dumps(after))
    assert report_models.main([str(after_path), "--before", str(before_path)]) == 0
    assert "Before → after" in capsys.readouterr().out


def test_sampled_in_place_of_exact_is_marked():
    """The causal LM is benchmarked with sampled instead of exact (models.Spec.kinds): its
    cells sit in the exact columns, marked "(sampled)"."""
    plans = {"empirical": {"method": "factored", "K": 1, "rows": 64, "jit_compile": True},
             "sampled": {"method": "factored", "K": 1, "rows": 64, "jit_compile": True}}
    doc = {"benchmarks": [_steady("gpt2_lm", examples=64, params=200_000,
                                  medians={"floor_xla": 0.10, "floor_noxla": 0.20, "empirical": 0.25, "sampled": 0.30},
                                  first={"floor_xla": 2.0, "floor_noxla": 1.0, "empirical": 4.0, "sampled": 5.0},
                                  plans=plans)]}
    text = report_models.render(doc)
    assert ("| gpt2_lm | factored (64 rows) | 1 | 2.50× | 3.00× (sampled) | – "
            "| 2.0 s (xla) → 4.0 s / 5.0 s (sampled) | 200 k | – |") in text
    assert "| gpt2_lm | 64 | 100.0 ms / 200.0 ms | 250.0 ms | 300.0 ms (sampled) | – | 7 |" in text
    after = report_models.comparison_table(doc, doc)
    assert "| gpt2_lm | 2.50× → 2.50× | 3.00× → 3.00× |" in after


def _large(model, records, medians, first, peaks):
    return {"name": f"test_large[CPU:0-{model}]", "group": f"large-{model}[CPU:0]", "stats": {"median": 0.0},
            "extra_info": {"role": "large", "model": model, "describe": "224×224, 4", "params": 86_600_000,
                           "records": records, "medians": medians, "first_call_s": first,
                           "plans": {k: r["plan"] for k, r in records.items() if "plan" in r},
                           "errors": {}, "peak_bytes": peaks, "first_call_peak_bytes": {}}}


def test_large_table_rows():
    plan = {"method": "factored", "K": 1, "rows": 16, "jit_compile": True}
    doc = {"datetime": "2026-12-01T00:00:00", "machine_info": {"cpu": {"count": 2}, "python_version": "3.11"},
           "benchmarks": [
               # floor noxla 2.0 s is the faster: empirical 3.0 → 1.50×, sampled 5.0 → 2.50×; first calls 4 s
               # → 10 s (2.5×) and 6 s (1.5×); exact refused after 0.25 s; peaks 2 GiB → 3 / 5 GiB
               _large("vit_b16", {"floor_xla": {}, "floor_noxla": {}, "empirical": {"plan": plan},
                                  "sampled": {"plan": plan, "warnings": ["fastewc: no factored Fisher rule for 'x'"]},
                                  "exact": {"refused": "ValueError: ... Use kind='sampled' ...", "refused_after_s": 0.25}},
                      medians={"floor_xla": 2.5, "floor_noxla": 2.0, "empirical": 3.0, "sampled": 5.0},
                      first={"floor_xla": 9.0, "floor_noxla": 4.0, "empirical": 10.0, "sampled": 6.0},
                      peaks={"floor_noxla": 2 * 2**30, "empirical": 3 * 2**30, "sampled": 5 * 2**30}),
               _large("resnet50", {"floor_noxla": {}, "empirical": {"plan": plan},
                                   "exact": {"plan": dict(plan, K=999), "exact_not_run": "K = 999"}},
                      medians={"floor_noxla": 1.0, "empirical": 1.2}, first={"floor_noxla": 3.0, "empirical": 6.0},
                      peaks={})]}
    text = report_models.render(doc)
    assert ("| vit_b16 (224×224, 4) | 86.6 M | factored (16 rows) | 2.0 s / 4.0 s (noxla) | 1.50× | 2.50× "
            "| refused in 0.2 s (suggests sampled) | 2.5× / 1.5× | 2.0 → 3.0 / 5.0 |") in text
    assert "| resnet50 (224×224, 4) | 86.6 M | factored (16 rows) | 1.0 s / 3.0 s (noxla) | 1.20× | – " \
           "| not refused, not run: K = 999 | 2.0× / – | – → – / – |" in text
    assert "- vit_b16 / sampled: fastewc: no factored Fisher rule for 'x'" in text
