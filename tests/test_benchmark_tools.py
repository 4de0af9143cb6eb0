"""The benchmark machinery: device parametrization and the ratio report."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import report  # noqa: E402


def _bench(name, group, median, **extra):
    return {"name": f"test_x[{name}]", "group": group, "stats": {"median": median}, "extra_info": extra}


def test_report_ratios_to_floor_and_loop(tmp_path):
    group = "mlp-fisher[CPU:0]"
    doc = {"datetime": "2026-11-22T00:00:00", "machine_info": {"cpu": {"count": 2}, "python_version": "3.11"},
           "benchmarks": [
               _bench("floor-xla", group, 0.010, role="floor"),
               _bench("floor-noxla", group, 0.020, role="floor"),
               _bench("loop-exact", group, 40.0, role="loop", kind="exact"),
               _bench("factored-exact", group, 0.025, role="method", kind="exact"),
           ]}
    text = report.render(doc)
    # factored: 0.025 / 0.010 = 2.50x the (faster) floor, 40 / 0.025 = 1600x faster than the loop
    assert "| factored-exact | 25.0 ms | 2.50× | 1600× |" in text
    assert "| loop-exact | 40.00 s | 4000.00× | – |" in text
    path = tmp_path / "doc.json"
    path.write_text(json.dumps(doc))
    assert report.main([str(path), "--png", str(tmp_path / "chart.png")]) == 0
    assert (tmp_path / "chart.png").stat().st_size > 1000


def test_report_scaling_table_and_curves(tmp_path):
    group = "scaling-examples[CPU:0]"
    doc = {"benchmarks": [
        _bench(f"s-{n}-{m}", group, t, role="scaling", axis="examples", size=n, method=m, peak_bytes=mb * 2**20,
               peak_measure="process RSS above baseline")
        for n, m, t, mb in [(512, "factored", 0.02, 10), (2048, "factored", 0.08, 12), (512, "vmap", 0.9, 300)]]}
    text = report.render(doc)
    assert "| factored | 20.0 ms, 10 MiB | 80.0 ms, 12 MiB |" in text
    assert "| vmap | 900.0 ms, 300 MiB | – |" in text
    assert report.scaling_curves(doc, tmp_path / "curves.png")


def test_benchmarks_run_on_every_logical_device():
    env = dict(os.environ, FASTEWC_BENCH_LOGICAL_CPUS="2", TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "benchmarks/bench_fisher.py", "-q", "-p", "no:cacheprovider",
         "--benchmark-disable", "-k", "floor and mlp and noxla", "-rA"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "PASSED benchmarks/bench_fisher.py::test_floor[CPU:0-mlp-noxla]" in proc.stdout
    assert "PASSED benchmarks/bench_fisher.py::test_floor[CPU:1-mlp-noxla]" in proc.stdout


def test_ab_inprocess_imports_a_commit_under_its_own_name(tmp_path, monkeypatch):
    """The old side of benchmarks.ab_inprocess is the commit's package, renamed: its modules
    import each other, never this tree's fastewc."""
    import fastewc
    from benchmarks import ab_inprocess
    monkeypatch.setattr(sys, "path", list(sys.path))
    old = ab_inprocess.import_old("HEAD", tmp_path)
    try:
        assert old.__name__.startswith("fastewc_") and tmp_path in Path(old.__file__).parents
        assert old.EWC is not fastewc.EWC
        inner = [m for name, m in sys.modules.items() if name.startswith(old.__name__ + ".")]
        assert inner and all(tmp_path in Path(m.__file__).parents for m in inner)
        imported = {v.__name__ for m in inner for v in vars(m).values() if isinstance(v, type(sys))}
        ours = {name for name in imported if name.split(".")[0].startswith("fastewc")}
        assert ours and all(name.split(".")[0] == old.__name__ for name in ours)
    finally:
        for name in [n for n in sys.modules if n.split(".")[0] == old.__name__]:
            del sys.modules[name]
