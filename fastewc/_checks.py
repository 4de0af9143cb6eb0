"""Argument checks shared by the public entry points.

Every message follows the Keras 3 style: it names the argument, the constraint and the
value received, e.g. "`lam` must be >= 0. Received: lam=-1".
"""


def check_one_of(name, value, allowed):
    if value not in allowed:
        choices = ", ".join(repr(a) for a in allowed)
        raise ValueError(f"`{name}` must be one of {choices}. Received: {name}={value!r}")
    return value


def check_positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"`{name}` must be a positive integer. Received: {name}={value!r}")
    return value


def check_seed(seed):
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**31:
        raise ValueError(f"`seed` must be None or an integer in [0, 2**31). Received: seed={seed!r}")
    return seed
