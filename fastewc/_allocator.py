"""The C allocator's free memory, returned to the system (glibc's ``malloc_trim``).

A module of its own, importing nothing but ``ctypes``: a test loads it alone in a fresh
process, where no other thread allocates between its mallocs and the reading of the
resident set."""
import ctypes


def release_free_memory():
    """Return the C allocator's free memory to the system: glibc's ``malloc_trim(0)``
    (a no-op where the C library has none).

    glibc serves blocks below its mmap threshold from its heaps and keeps them when they
    are freed, and the threshold grows (to 32 MiB) each time a larger mmapped block is
    freed, so after a Fisher the per-layer tensors it freed stay resident (gigabytes at
    GPT-2 base size: README, "Real sizes") until the process reuses them.  Called once
    per :meth:`fastewc.EWC.consolidate`, not per Fisher call: the next call would fault
    those pages back in."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError, TypeError):     # no C library by that name (Windows)
        return False
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return bool(trim(0))
