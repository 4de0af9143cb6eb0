"""The EWC file at real sizes (issue 24 item 6): read and written without holding more than
the state's one copy, byte-compatible with the format as documented, and a damaged file
refused without changing any state.

The reference is the format itself, written here from its description (fastewc/ewc_file.py's
docstring) with NumPy and hashlib only; memory is what ``tracemalloc`` sees NumPy and Python
allocate (NumPy reports its array buffers to it), a count of bytes, not a timing."""
import hashlib
import json
import tracemalloc
import zipfile

import keras
import numpy as np
import pytest

import fastewc
from fastewc import ewc_file

MIB = 2 ** 20


def reference_file(path, header, arrays):
    """The EWC file format written from its description: the header as UTF-8 JSON in a
    uint8 array, its ``sha256`` over the canonical JSON of the rest of the header followed by
    each array's name and little-endian float32 bytes in (index, name) order, then
    ``np.savez`` of header and arrays."""
    h = hashlib.sha256(json.dumps(header, sort_keys=True).encode("utf-8"))
    order = sorted(arrays, key=lambda name: (int(name.rpartition("_")[2]), name.rpartition("_")[0]))
    for name in order:
        h.update(name.encode("utf-8"))
        h.update(np.asarray(arrays[name], "<f4").tobytes())
    header = dict(header, sha256=h.hexdigest())
    raw = np.frombuffer(json.dumps(header, sort_keys=True).encode("utf-8"), np.uint8)
    np.savez(path, header=raw, **arrays)


def members(path):
    """{member name: its bytes} of a zip archive (what np.load reads; not the timestamps)."""
    with zipfile.ZipFile(path) as z:
        return {info.filename: z.read(info) for info in z.infolist()}


def small_ewc():
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(3, name="h"),
                              keras.layers.Dense(2, name="out")])
    ewc = fastewc.EWC(model, lam=0.5)
    rng = np.random.default_rng(0)
    ewc.add_task([rng.random(v.shape, np.float32) for v in model.trainable_variables])
    return model, ewc


def test_save_writes_the_documented_format_and_such_a_file_loads(tmp_path):
    model, ewc = small_ewc()
    state = ewc.state()
    header = {"format": "fastewc.EWC", "version": 1, "mode": "separate", "lam": 0.5, "gamma": 1.0,
              "num_tasks": 1, "const": float(ewc._const.numpy()),
              "variables": [{"path": k, "shape": list(a.shape)} for k, (a, _) in state.items()],
              "excluded": []}
    arrays = {}
    for i, (a, mu) in enumerate(state.values()):
        arrays[f"fisher_{i}"], arrays[f"anchor_{i}"] = a, mu
    reference_file(tmp_path / "reference.npz", header, arrays)
    ewc.save(tmp_path / "saved.npz")
    assert members(tmp_path / "saved.npz") == members(tmp_path / "reference.npz")
    loaded = fastewc.EWC.load(tmp_path / "reference.npz", model)
    assert loaded.num_tasks == 1 and loaded.tracked_paths == list(state)
    for (a, mu), (a2, mu2) in zip(state.values(), loaded.state().values()):
        np.testing.assert_array_equal(a2, a)
        np.testing.assert_array_equal(mu2, mu)


@pytest.mark.parametrize("damage", ["checksum", "last_array_truncated"])
def test_a_damaged_file_changes_no_state(tmp_path, damage):
    """A damaged file (its last array edited under the old checksum, or the archive cut
    inside that array: everything before it parses) raises, and the model's weights and
    the EWC already on it are as they were."""
    model, ewc = small_ewc()
    before = {k: (a.copy(), mu.copy()) for k, (a, mu) in ewc.state().items()}
    weights = [w.copy() for w in model.get_weights()]
    good = tmp_path / "good.npz"
    ewc.save(good)
    raw = bytearray(good.read_bytes())
    if damage == "checksum":
        with np.load(good) as npz:
            contents = {k: npz[k].copy() for k in npz.files}
        last = max((k for k in contents if k != "header"), key=lambda n: int(n.rpartition("_")[2]))
        contents[last].reshape(-1)[-1] += 1.0
        np.savez(tmp_path / "bad.npz", **contents)
    else:
        with zipfile.ZipFile(good) as z:
            info = z.infolist()[-1]
        cut = info.header_offset + 30 + len(info.filename) + info.compress_size // 2
        (tmp_path / "bad.npz").write_bytes(bytes(raw[:cut]))
    with pytest.raises(ValueError, match="not a valid fastewc EWC file"):
        fastewc.EWC.load(tmp_path / "bad.npz", model)
    with pytest.raises(ValueError, match="not a valid fastewc EWC file"):
        ewc_file.read(tmp_path / "bad.npz")
    assert ewc.num_tasks == 1
    for key, (a, mu) in ewc.state().items():
        np.testing.assert_array_equal(a, before[key][0])
        np.testing.assert_array_equal(mu, before[key][1])
    for w, w0 in zip(model.get_weights(), weights):
        np.testing.assert_array_equal(w, w0)


def _traced_peak(fn):
    """(result, the most bytes NumPy and Python held at once during ``fn()``, above before)."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        result = fn()
        return result, tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


def test_read_and_write_hold_at_most_one_copy_of_the_state(tmp_path):
    """Reading holds the arrays it returns (one copy of the state) and a chunk, never the
    file's bytes besides them; writing holds a chunk (NumPy's 16 MiB write buffer), never a
    copy of an array.  Two 20 MiB arrays: a whole-array copy would show."""
    n = 5 * MIB                          # float32: 20 MiB each
    state = {"big": (np.arange(n, dtype=np.float32), -np.arange(n, dtype=np.float32))}
    contents = ewc_file.EWCFile(mode="separate", lam=1.0, gamma=1.0, num_tasks=1, const=0.0,
                                state=state, excluded=[])
    state_bytes = 2 * 4 * n
    path = tmp_path / "big.npz"
    _, written = _traced_peak(lambda: ewc_file.write(path, contents))
    assert written <= 17 * MIB, written / MIB
    back, read = _traced_peak(lambda: ewc_file.read(path))
    assert read <= state_bytes + 17 * MIB, read / MIB
    np.testing.assert_array_equal(back.state["big"][0], state["big"][0])
    np.testing.assert_array_equal(back.state["big"][1], state["big"][1])


def test_load_lets_each_array_go_once_its_variable_holds_it(tmp_path, monkeypatch):
    """``EWC.load`` holds the file's arrays only until their variables exist: when the
    j-th of the state's n variables is created, the first j arrays are already gone
    (weak references to every array the file read; each creation counts the live ones),
    so a load ends with one copy of the state, not two."""
    import weakref

    import tensorflow as tf
    from fastewc.blocks import store

    model, ewc = small_ewc()
    path = tmp_path / "state.npz"
    ewc.save(path)
    refs, alive_at_creation = [], []
    real_read = ewc_file.read

    def read_and_watch(p):
        contents = real_read(p)
        refs.extend(weakref.ref(a) for fields in contents.state.values() for a in fields)
        return contents

    class WatchedTF:                                  # the store's `tf`, counting at each variable
        def __getattr__(self, name):
            return getattr(tf, name)

        @staticmethod
        def Variable(value, **kwargs):                # noqa: N802 - tf.Variable's name
            alive_at_creation.append(sum(r() is not None for r in refs))
            return tf.Variable(value, **kwargs)

    monkeypatch.setattr(ewc_file, "read", read_and_watch)
    monkeypatch.setattr(store, "tf", WatchedTF())
    loaded = fastewc.EWC.load(path, model)
    n = len(refs)
    assert n == 2 * len(model.trainable_variables)
    assert alive_at_creation[-n:] == [n - j for j in range(n)]
    for (a, mu), (a2, mu2) in zip(ewc.state().values(), loaded.state().values()):
        np.testing.assert_array_equal(a2, a)
        np.testing.assert_array_equal(mu2, mu)
