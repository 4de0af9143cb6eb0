"""Text for the demo's language-model scenario, from files every CPython installation has
(no download), as byte-level token windows.

* task 1, ``docs``: the English documentation CPython ships for ``help()``,
  ``pydoc_data.topics.topics`` (a dict topic -> text; 79 topics, ~465 KB in 3.11);
* task 2, ``code``: Python source of the standard library, the ``*.py`` files directly in
  ``os.path.dirname(os.__file__)`` (no sub-packages), read as bytes.

Documents are taken in sorted order (topic names, file names) and split BY DOCUMENT, by
their index i in that order: ``i % 10 == 3`` validation, ``i % 10 == 7`` test, the rest
train; then each split keeps its documents in order until ``max_bytes[split]`` bytes
(the document that crosses the budget is cut there).  Nothing is random: the same Python
installation gives the same windows; a different Python version ships other text.

Tokens: the UTF-8 bytes (ids 0..255), :data:`EOS` (256) after every document, and
:data:`PAD` (257) for padding; :data:`VOCAB` = 258.  A split is one stream, its documents
each followed by EOS, cut into windows of ``seq_len`` inputs with stride ``seq_len``:
window w has inputs ``stream[w·T : (w+1)·T]`` and targets (the next tokens)
``stream[w·T+1 : (w+1)·T+1]``, so every next-token prediction of the stream appears in
exactly one window.  The last window is shorter: its inputs and targets are padded with
PAD, and ``mask`` (1 = a real target) marks the real positions; the model's
``padding_mask`` is the same mask (a causal model never attends to later positions, so
the padding after the last real token changes nothing before it).
"""
import dataclasses
import os

import numpy as np

EOS = 256
PAD = 257
VOCAB = 258
SPLITS = ("train", "val", "test")


def encode(text):
    """The UTF-8 bytes of ``text`` (str or bytes) as int32 ids in [0, 256)."""
    data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    return np.frombuffer(data, dtype=np.uint8).astype(np.int32)


def decode(ids):
    """The text of byte ids (ids >= 256, EOS and PAD, are dropped)."""
    ids = np.asarray(ids)
    return bytes(ids[ids < 256].astype(np.uint8)).decode("utf-8", errors="replace")


def doc_documents():
    """Task 1: ``[(topic, text), ...]`` of ``pydoc_data.topics.topics``, sorted by topic."""
    from pydoc_data.topics import topics
    return sorted(topics.items())


def code_documents():
    """Task 2: ``[(file name, bytes), ...]`` of the standard library's top-level ``*.py``
    files (``os.path.dirname(os.__file__)``), sorted by name."""
    root = os.path.dirname(os.__file__)
    names = sorted(n for n in os.listdir(root) if n.endswith(".py"))
    out = []
    for name in names:
        with open(os.path.join(root, name), "rb") as f:
            out.append((name, f.read()))
    return out


def split_of(index):
    """The split of the document at ``index`` in sorted order."""
    return "val" if index % 10 == 3 else "test" if index % 10 == 7 else "train"


def split_documents(documents, max_bytes):
    """``{split: [(name, byte ids), ...]}``: documents split by index (:func:`split_of`),
    each split cut at ``max_bytes[split]`` bytes (a document crossing it is truncated)."""
    out = {s: [] for s in SPLITS}
    used = dict.fromkeys(SPLITS, 0)
    for i, (name, text) in enumerate(documents):
        split = split_of(i)
        room = max_bytes[split] - used[split]
        if room <= 0:
            continue
        ids = encode(text)[:room]
        out[split].append((name, ids))
        used[split] += len(ids)
    return out


def stream(documents):
    """One int32 stream: each document's ids followed by EOS."""
    parts = []
    for _, ids in documents:
        parts += [ids, np.array([EOS], np.int32)]
    return np.concatenate(parts) if parts else np.zeros(0, np.int32)


def windows(ids, seq_len):
    """``(inputs, targets, mask)``, each (n, seq_len) int32, of the stream ``ids`` (module
    docstring): targets are the inputs shifted by one; the last window is padded with PAD
    and ``mask`` is 1 exactly where a target is real."""
    ids = np.asarray(ids, np.int32)
    predictions = len(ids) - 1                     # next-token predictions in the stream
    if predictions < 1:
        raise ValueError(f"A stream needs at least 2 tokens. Received: {len(ids)} tokens")
    n = -(-predictions // seq_len)
    padded = np.full(n * seq_len + 1, PAD, np.int32)
    padded[:len(ids)] = ids
    inputs = padded[:-1].reshape(n, seq_len)
    targets = padded[1:].reshape(n, seq_len)
    mask = (np.arange(n * seq_len) < predictions).reshape(n, seq_len).astype(np.int32)
    inputs = np.where(mask == 1, inputs, PAD)      # the last real input's successor is padding
    return inputs, targets, mask


@dataclasses.dataclass(frozen=True)
class Split:
    """One split of one task: windows and the documents they came from."""
    inputs: np.ndarray     # (n, T) int32 token ids
    targets: np.ndarray    # (n, T) int32 next tokens (PAD where mask is 0)
    mask: np.ndarray       # (n, T) int32, 1 = a real target
    documents: tuple       # names, in stream order
    num_bytes: int

    @property
    def x(self):
        """The keras_hub model input: ``{"token_ids", "padding_mask"}``."""
        return {"token_ids": self.inputs, "padding_mask": self.mask}

    @property
    def tokens(self):
        return int(self.mask.sum())


@dataclasses.dataclass(frozen=True)
class TextTask:
    name: str
    description: str
    train: Split
    val: Split
    test: Split

    def split(self, name):
        return getattr(self, name)

    def summary(self):
        return {"name": self.name, "description": self.description,
                **{s: {"documents": len(self.split(s).documents), "bytes": self.split(s).num_bytes,
                       "windows": int(len(self.split(s).inputs)), "tokens": self.split(s).tokens,
                       "first_documents": list(self.split(s).documents[:3])}
                   for s in SPLITS}}


def make_task(name, description, documents, seq_len, max_bytes):
    parts = split_documents(documents, max_bytes)
    splits = {}
    for s in SPLITS:
        inputs, targets, mask = windows(stream(parts[s]), seq_len)
        splits[s] = Split(inputs, targets, mask, tuple(n for n, _ in parts[s]),
                          int(sum(len(ids) for _, ids in parts[s])))
    return TextTask(name=name, description=description, **splits)


def load_tasks(seq_len, max_bytes):
    """The two tasks (docs, then code) as :class:`TextTask` windows of ``seq_len``."""
    return (
        make_task("docs", "CPython's English help() documentation (pydoc_data.topics)",
                  doc_documents(), seq_len, max_bytes),
        make_task("code", "standard-library Python source (top-level *.py files, sorted)",
                  code_documents(), seq_len, max_bytes),
    )
