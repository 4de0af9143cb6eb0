"""profiles/: a tiny capture writes .xplane.pb traces labelled with fastewc's three scopes,
and the summarizer turns them into markdown tables."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from profiles import capture, summarize  # noqa: E402

SMALL = ("mlp_train_eager", "mlp_train_compiled", "mlp_fisher_loop", "mlp_fisher_factored")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("runs"))
    records = {name: capture.capture(name, out, small=True, log=lambda *a, **k: None)
               for name in SMALL}
    return out, records


def _event_names(path):
    """Every event name in the trace, read through TensorFlow's XPlane protobuf."""
    space = summarize.load_space(path)
    names = set()
    for plane in space.planes:
        for line in plane.lines:
            names.update(plane.event_metadata[e.metadata_id].name for e in line.events)
    return names


def _trace(out, name):
    files = capture.xplane_files(os.path.join(out, name))
    assert len(files) == 1, files
    return files[0]


def test_capture_writes_xplane_with_the_three_scopes(runs):
    out, records = runs
    names = {name: _event_names(_trace(out, name)) for name in SMALL}
    everything = set().union(*names.values())
    for scope in summarize.SCOPES:
        assert any(n == scope or n.startswith(scope + "/") or f"/{scope}/" in f"/{n}"
                   for n in everything), scope
    # Where each name comes from.
    assert "fastewc/train_step" in names["mlp_train_eager"]
    assert "fastewc/penalty" in names["mlp_train_eager"]                    # annotation
    assert any(n.startswith("fastewc/penalty/") and ":" in n                  # graph op names
               for n in names["mlp_train_eager"])                           # (penalty.py scope)
    assert "fastewc/train_step" in names["mlp_train_compiled"]
    assert "fastewc/fisher" in names["mlp_fisher_loop"]
    assert "fastewc/fisher" in names["mlp_fisher_factored"]
    assert records["mlp_train_eager"]["iterations"] == 2
    assert records["mlp_fisher_factored"]["machine"]["tensorflow"]


def test_summary_scopes_and_tables(runs, tmp_path):
    out, _ = runs
    results = {name: a for name, _, a in summarize.summarize(out)[1]}
    assert list(results) == list(SMALL)                    # capture order, one per capture
    for name, a in results.items():
        assert 0 < a["device"] <= a["wall"], name
        assert a["host_only"] == a["wall"] - a["device"]
        assert any(kind in summarize.OP_KINDS for kind, _ in a["groups"]), name
    compiled = results["mlp_train_compiled"]["scopes"]
    # The penalty inside the compiled step: op names, or HLO metadata under XLA.
    assert 0 < compiled["fastewc/penalty"] < compiled["fastewc/train_step"]
    assert results["mlp_train_eager"]["scopes"]["fastewc/penalty"] > 0
    assert results["mlp_fisher_factored"]["scopes"]["fastewc/fisher"] > 0
    assert results["mlp_fisher_loop"]["scopes"]["fastewc/train_step"] == 0

    readme = tmp_path / "README.md"
    stale = "STALE-SUMMARY-a7f3c9"          # a marker no op name or table can contain
    readme.write_text(f"intro\n{summarize.BEGIN}\n{stale}\n{summarize.END}\noutro\n")
    assert summarize.main([out, "--top", "3", "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("outro\n") and stale not in text
    assert "| capture | what ran |" in text and "| # | op | kind |" in text
    for name in SMALL:
        assert f"| {name} |" in text and f"#### {name}" in text


def test_self_time_from_nesting():
    """Self time = duration − direct children, per line; nested runtime work in a kernel
    counts for the kernel; device = union of kernel intervals."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    space = xplane_pb2.XSpace()
    plane = space.planes.add(name="/host:CPU")
    names = {1: "fastewc/train_step", 2: "outer:MatMul", 3: "ParallelFor", 4: "b:Mul"}
    for i, n in names.items():
        plane.event_metadata[i].id, plane.event_metadata[i].name = i, n
    line = plane.lines.add(id=1, name="python", timestamp_ns=0)
    for mid, off, dur in [(1, 0, 100), (2, 10, 50), (3, 20, 10), (4, 70, 20)]:
        line.events.add(metadata_id=mid, offset_ps=off * 1000, duration_ps=dur * 1000)
    a = summarize.analyze(space)
    groups = {k: (c, ps // 1000) for k, (c, ps) in a["groups"].items()}
    assert groups[("runtime", "fastewc/train_step")] == (1, 30)
    assert groups[("tf", "MatMul")] == (1, 50)             # 40 own + 10 of its ParallelFor
    assert groups[("tf", "Mul")] == (1, 20)
    assert (a["wall"], a["device"], a["host_only"]) == (100_000, 70_000, 30_000)
    assert a["scopes"]["fastewc/train_step"] == 100_000


def test_only_selects_by_name_workload_or_kind():
    assert capture.select("mlp") == [c for c in capture.CAPTURES if c.startswith("mlp_")]
    assert capture.select("fisher_loop") == ["mlp_fisher_loop", "cnn_fisher_loop"]
    assert capture.select("cnn_train_eager,mlp") == [c for c in capture.CAPTURES
                                                      if c.startswith("mlp_") or c == "cnn_train_eager"]
    with pytest.raises(SystemExit, match="unknown: bogus"):
        capture.select("mlp,bogus")
