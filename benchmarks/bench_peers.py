"""fastewc's KFAC factors against the PyTorch peers (ASDL, curvlinops) and the hand-written
kernel: ``benchmarks/peers_kfac.py`` as a pytest-benchmark suite, one test per (problem,
kind), its members rotated (``conftest.rotate``) after the agreement checks (logits to
1e-5; empirical and exact factors within 2e-6 of float64 for fastewc and the kernel, within
1e-4 for the PyTorch peers, whose float32 CNN factors are 5e-6 to 4e-5 off; sampled: A,
and G's shapes).  Needs torch, ``asdfghjkl`` and ``curvlinops-for-pytorch`` (``make
bench-peers`` installs them in ``.venv-peers``); without them every test skips.  The smoke
pass (``--benchmark-disable``) runs the MLP's exact kind on 8 examples.

    .venv-peers/bin/python -m pytest benchmarks/bench_peers.py --benchmark-only -q \\
        -o python_files=bench_*.py --benchmark-json=benchmarks/results/peers-bench.json
"""
import pytest

_WHY = ("the peers benchmark needs torch, asdfghjkl and curvlinops-for-pytorch, which .venv "
        "does not hold: `make bench-peers` installs them in .venv-peers")
pytest.importorskip("torch", reason=_WHY)
pytest.importorskip("asdl", reason=_WHY)
pytest.importorskip("curvlinops", reason=_WHY)

import torch  # noqa: E402

from benchmarks import peers_kfac  # noqa: E402
from benchmarks.conftest import rotate  # noqa: E402

torch.set_num_threads(peers_kfac.threads())
pytestmark = pytest.mark.filterwarnings("ignore:Using a non-full backward hook:FutureWarning")


@pytest.mark.parametrize("kind", peers_kfac.KINDS)
@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_peers(benchmark, smoke, device, name, kind):
    if device != "CPU:0":
        pytest.skip("the peers run on the CPU")
    if smoke and (kind != "exact" or name != "mlp"):
        pytest.skip("smoke subset: the MLP, exact")
    group = peers_kfac.Group(name, kind, small=smoke)
    agreement = group.agreement()
    for member, errors in agreement.items():
        bound = peers_kfac.AGREEMENT if member in ("fastewc", "kernel") else peers_kfac.PEER_AGREEMENT
        for factor in ("a", "g"):
            if errors[factor] is not None:
                assert errors[factor] <= bound, (member, factor, errors)
    benchmark.group = f"kfac-peers[{device}]"
    times = rotate(benchmark, group.members, rounds=3 if smoke else peers_kfac.ROUNDS[name])
    medians = None if times is None else {k: sorted(t)[len(t) // 2] for k, t in times.items()}
    benchmark.extra_info.update(problem=name, kind=kind, agreement=agreement, medians=medians)
