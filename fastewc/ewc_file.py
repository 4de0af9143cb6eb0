"""The EWC file format: one ``.npz`` holding an EWC's state, verified on read.

Layout (``FORMAT = "fastewc.EWC"``): ``header``, UTF-8 JSON as a uint8 array (``format``,
``version``, ``mode``, ``lam``, ``gamma``, ``num_tasks``, ``const`` (c), ``excluded`` (paths
excluded when saved) and ``sha256``), then each block kind's section (its
``FILE_FIELD`` of :class:`EWCFile`, :mod:`fastewc.blocks`): its header fields and arrays.

* Version 1: the diagonal's, ``variables`` (a list of ``{"path", "shape"}`` in state order)
  and the arrays ``fisher_i`` and ``anchor_i`` (A and μ of the i-th variable, float32 of its
  shape; :class:`fastewc.blocks.diagonal.Diagonal`).
* Version 2 (written when a kind of version 2 has a section; version 1 files still read)
  adds ``curvature``, ``damping``, ``kfac_sum`` and the Kronecker blocks: ``kronecker``, a
  list of ``{"kernel", "bias", "coefficients", "rows", "units"}`` (and ``"a": "diagonal"``
  for a block whose A is stored as its diagonal: an Embedding's), and the arrays ``kfaca_j``,
  ``kfacg_j``, ``kfacw_j`` of the j-th term over all blocks
  (:class:`fastewc.blocks.kronecker.Kronecker`), and the EKFAC blocks (``ekfac``, a list of
  ``{"kernel", "bias", "terms", "rows", "units"}``; arrays ``ekfua_j``, ``ekfug_j``, ``ekfs_j``,
  ``ekfw_j``, :class:`fastewc.blocks.ekfac.EKFAC`).
* Version 3 (written only when an EKFAC block carries ``"eigenvalues": true``: an online
  state's factor sums' eigenvalues, arrays ``ekfla_i``, ``ekflg_i``) is version 2 with them;
  fastewc before it refuses such a file by its version, not as corrupt.

A file is written at the largest version its sections need (each kind's
``file_version(section)``, :mod:`fastewc.blocks.base`), so a file without what a newer
version added keeps the version older readers read; the readable versions are the union
of the kinds' ``file_versions()`` (:func:`readable_versions`), and a kind's section is read
from a file of version ``FILE_VERSION`` or later.

``sha256`` is the SHA-256 of the header without it (canonical JSON) followed by, for each
array in (i, name) order, its name and its little-endian float32 bytes: a flipped bit in
any array or header field is caught.

Writes are atomic: a temporary file in the same directory, flushed and fsync'ed, then
``os.replace`` over the target and an fsync of the directory, so a reader sees the old
file or the new one, never a partial one.  Reads check the container, the header, every
array's dtype and shape and the checksum before returning anything; ANY failure to parse
the bytes (whatever zipfile, zlib or NumPy raise for them: BadZipFile, NotImplementedError
for an unknown zip version or compression, RuntimeError for an "encrypted" member, EOF,
...) is the one ``ValueError: ... is not a valid fastewc EWC file``.  Only the file
system's errors (a missing file, permissions) pass through as they are.

Memory: neither direction holds a second copy of the state.  A write hashes each array
where it is and streams it into the archive in NumPy's chunks; a read takes the archive's
members one at a time from the open file (never the whole file's bytes), hashing each as it
is read, so it holds the arrays it returns and a chunk.

Only the format lives here; what the values mean (and whether they are valid EWC
arguments) is :class:`fastewc.EWC`'s.
"""
import hashlib
import json
import os
import tempfile
from typing import NamedTuple

import numpy as np

from fastewc.blocks import KINDS

FORMAT = "fastewc.EWC"
_REQUIRED = ("mode", "lam", "gamma", "num_tasks", "const", "variables", "sha256")


class EWCFile(NamedTuple):
    """The contents of an EWC file.  ``state`` maps each variable's path to its (A, μ)
    float32 arrays, in state order (the diagonal kind's section, ``FILE_FIELD = "state"``);
    ``sections`` maps every other kind's ``FILE_FIELD`` to its section (each kind owns
    its own: ``{"kronecker": {(kernel path, bias path or None): [(c, A, G, W̄*)]}}``), a
    kind without state absent."""
    mode: str
    lam: float
    gamma: float
    num_tasks: int
    const: float
    state: dict
    excluded: list
    curvature: str = "diagonal"
    damping: float = 0.0
    kfac_sum: str = "exact"
    sections: dict = None        # {kind's FILE_FIELD: its section}, every kind but the diagonal

    def section(self, field):
        """The section of the kind whose ``FILE_FIELD`` is ``field``, or None."""
        return self.state if field == "state" else (self.sections or {}).get(field)

    @property
    def kronecker(self):
        """The Kronecker kind's section (``section("kronecker")``), or None."""
        return self.section("kronecker")


def write(path, contents):
    """Write ``contents`` (an :class:`EWCFile`) to ``path``, atomically."""
    path = os.fspath(path)
    kinds = [kind for kind in KINDS.values() if contents.section(kind.FILE_FIELD) is not None]
    version = max(kind.file_version(contents.section(kind.FILE_FIELD)) for kind in kinds)
    header = {
        "format": FORMAT, "version": version, "mode": contents.mode,
        "lam": contents.lam, "gamma": contents.gamma, "num_tasks": contents.num_tasks,
        "const": contents.const, "excluded": list(contents.excluded),
    }
    if version >= 2:
        header.update(curvature=contents.curvature, damping=contents.damping, kfac_sum=contents.kfac_sum)
    arrays = {}
    for kind in kinds:
        fields, kind_arrays = kind.file_arrays(contents.section(kind.FILE_FIELD))
        header.update(fields)
        arrays.update(kind_arrays)
    header["sha256"] = digest(header, arrays)
    header_bytes = np.frombuffer(json.dumps(header, sort_keys=True).encode("utf-8"), np.uint8)
    def save(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, header=header_bytes, **arrays)

    replace_atomically(path, save)


def replace_atomically(path, write, suffix=".tmp"):
    """``write(tmp)`` to a new temporary file next to ``path`` (its name ending in
    ``suffix``), fsync it, rename it over ``path`` and fsync the directory (the rename itself
    durable); on any error the temporary file is removed and ``path`` is left as it was."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".", suffix=suffix)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_directory(directory)


def readable_versions():
    """The file versions this fastewc reads: every version a kind writes its section at."""
    return tuple(sorted({v for kind in KINDS.values() for v in kind.file_versions()}))


def read(path):
    """The verified :class:`EWCFile` at ``path``; ValueError for anything malformed."""
    path = os.fspath(path)
    header, arrays = _read_verified(path)
    sections = {kind.FILE_FIELD: kind.read_file_arrays(header, arrays) for kind in KINDS.values()
                if kind.FILE_VERSION <= header["version"]}
    return EWCFile(mode=header["mode"], lam=header["lam"], gamma=header["gamma"],
                   num_tasks=header["num_tasks"], const=header["const"],
                   excluded=list(header.get("excluded", [])),
                   curvature=header.get("curvature", "diagonal"), damping=header.get("damping", 0.0),
                   kfac_sum=header.get("kfac_sum", "exact"), state=sections.pop("state"),
                   sections=sections)


def digest(header, arrays):
    """SHA-256 over the header (without its digest) and every array's bytes, in order."""
    h = _digest_start(header)
    for name in sorted(arrays, key=_array_order):
        _digest_update(h, name, arrays[name])
    return h.hexdigest()


def _digest_start(header):
    """The SHA-256 state after the header (without its digest): :func:`digest`'s first part."""
    body = {k: v for k, v in header.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode("utf-8"))


def _digest_update(h, name, array):
    """Add one array (its name, then its little-endian float32 bytes) to ``h``, in place: the
    bytes are hashed where they are (no copy of a contiguous little-endian float32 array)."""
    arr = np.ascontiguousarray(array, dtype="<f4")
    h.update(name.encode("utf-8"))
    h.update(arr.reshape(-1).view(np.uint8))


def _array_order(name):
    kind, _, index = name.rpartition("_")
    return (int(index), kind)


def fsync_directory(directory):
    """fsync ``directory`` (makes a rename in it durable); a no-op where unsupported."""
    try:
        dir_fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(dir_fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(dir_fd)


def _read_verified(path):
    """(header, arrays) from an EWC file, verified; ValueError for anything malformed.

    Streams: the archive's members are read one at a time from the open file (never the
    whole file in memory), each array checked (dtype, shape) and hashed as it is read, so
    the arrays are the one copy of the state this holds; nothing is returned unless the
    checksum over all of them matches."""
    def corrupt(reason):
        return ValueError(f"{path!r} is not a valid fastewc EWC file (truncated or corrupted?): {reason}")

    def member(npz, name):
        try:
            return npz[name]
        except Exception as err:     # noqa: BLE001 - damaged bytes raise many types (module docstring)
            raise corrupt(f"{type(err).__name__}: {err}") from None

    with open(path, "rb") as f:      # the file system's errors pass through
        try:
            npz = np.load(f, allow_pickle=False)
        except Exception as err:     # noqa: BLE001
            raise corrupt(f"{type(err).__name__}: {err}") from None
        if not isinstance(npz, np.lib.npyio.NpzFile):
            raise corrupt("not an .npz archive")
        with npz:
            names = set(npz.files)
            if "header" not in names:
                raise corrupt("no header")
            raw_header = member(npz, "header")
            try:
                header = json.loads(raw_header.tobytes().decode("utf-8"))
            except Exception as err:     # noqa: BLE001
                raise corrupt(f"unreadable header ({type(err).__name__}: {err})") from None
            expected = _expected_arrays(header, path, corrupt)
            if names - {"header"} != set(expected):
                raise corrupt(f"arrays {sorted((names - {'header'}) ^ set(expected))} missing or unexpected")
            h, arrays = _digest_start(header), {}
            for name in sorted(expected, key=_array_order):
                arr = member(npz, name)
                if arr.dtype != np.float32 or arr.shape != expected[name]:
                    raise corrupt(f"array {name!r} has {arr.dtype} {arr.shape}, expected float32 {expected[name]}")
                _digest_update(h, name, arr)
                arrays[name] = arr
    if h.hexdigest() != header["sha256"]:
        raise corrupt("SHA-256 checksum mismatch")
    return header, arrays


def _expected_arrays(header, path, corrupt):
    """{array name: shape} that a parsed ``header`` lists; ValueError if it is malformed."""
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise corrupt(f"format is not {FORMAT!r}")
    readable = readable_versions()
    if header.get("version") not in readable:
        raise ValueError(f"{path!r} has EWC file version {header.get('version')!r}; this fastewc "
                         f"reads versions {list(readable)}.")
    missing = [k for k in _REQUIRED if k not in header]
    if missing:
        raise corrupt(f"header lacks {missing}")
    expected = {}
    for kind in KINDS.values():
        if kind.FILE_VERSION <= header["version"]:
            try:
                expected.update(kind.file_shapes(header))
            except ValueError as err:
                raise corrupt(str(err)) from None
    return expected
