"""The one exception type that means "the user asked for something we cannot do".

The CLIs print these as a single line and exit non-zero; anything else is a bug and keeps
its traceback.
"""

import errno
import math
import numbers


class UserError(Exception):
    """Bad input or an unmet precondition; the message says what was wrong and what to do."""


# what to do with a store whose bytes are damaged or lost (verify.py: --repair)
DAMAGED_REMEDY = ("Copy it again from where it came (a copy cut short, most likely), or run "
                  "`featcache verify --repair` on it, then its extract command again: that "
                  "recomputes the damaged shards alone.")


def require(ok: bool, option: str, what: str, value: object) -> None:
    """Refuse `value` for `option` (named as the CLI spells it) unless `ok`, saying what it
    must be: bad numbers are caught here, not deep inside torch or timm."""
    if not ok:
        raise UserError(f"{option} must be {what}, not {value!r}")


def is_int(value: object) -> bool:
    """A whole number (numpy's too, so that grids made with np.arange pass), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    """A finite real number (an --lr of inf or nan would train nothing)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def disk_full(e: BaseException) -> bool:
    """An OSError that says the disk (or the user's quota) has no room left."""
    return isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)
