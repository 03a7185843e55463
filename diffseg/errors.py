"""Errors for bad input: the message always names the file (or key) and the problem."""


class InputError(ValueError):
    """Bad user input (a file, a folder, a config key); the CLI prints it without a traceback."""


class ConfigError(InputError):
    """A config that cannot be resolved: the message names the bad key or value."""


class DataError(InputError):
    """A data file that cannot be used: the message names the file and the problem."""


class DiskFullError(InputError):
    """A folder's device ran out of space: the message names the folder, what was being written,
    the space needed (when known) and what is kept. Nothing half-written is left behind."""


NO_SPACE = (28, 122)  # ENOSPC, EDQUOT (Linux): the device or the user's quota is full


def disk_full_cause(err: BaseException) -> OSError | None:
    """The "no space left" ``OSError`` in ``err``'s chain (``__cause__``/``__context__``), if any.

    Libraries that write from threads (orbax) re-raise it wrapped, or as a consequence of it.
    """
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in NO_SPACE:
            return err
        text = str(err)
        if "No space left on device" in text or "os_error_code='28'" in text:
            # TensorStore (orbax's writer) reports it as a ValueError("RESOURCE_EXHAUSTED: ...")
            return OSError(28, "No space left on device")
        err = err.__cause__ or err.__context__  # type: ignore[assignment]
    return None


def fmt_bytes(n: float) -> str:
    """A size as plain text in the largest unit that keeps it >= 1 (``1.5 GiB``)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


# Numbers in messages are plain text ("2.0 × 2.0 × 2.0 mm"), never numpy reprs such as
# "(np.float64(2.0), ...)" or "array([...])": format them with these.


def fmt_num(value: object, digits: int = 6) -> str:
    """A number as plain text: integers as integers, floats to ``digits`` significant digits."""
    try:
        as_int = int(value)  # type: ignore[call-overload]
        if not isinstance(value, float) and float(value) == as_int:  # type: ignore[arg-type]
            return str(as_int)
    except (TypeError, ValueError, OverflowError):  # NaN, inf, not a number
        pass
    try:
        return repr(float(f"{float(value):.{digits}g}"))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return str(value)


def fmt_shape(shape: object) -> str:
    """A shape (or a size in voxels) as ``"48 × 48 × 16"``."""
    return " × ".join(fmt_num(n) for n in _values(shape))


def fmt_mm(spacing: object, digits: int = 6) -> str:
    """A voxel spacing as ``"2.0 × 2.0 × 2.0 mm"``."""
    return " × ".join(fmt_num(s, digits) for s in _values(spacing)) + " mm"


def fmt_point(point: object, digits: int = 6, unit: str = "mm") -> str:
    """A point (an origin) as ``"(0.0, -12.5, 3.0) mm"``."""
    text = "(" + ", ".join(fmt_num(p, digits) for p in _values(point)) + ")"
    return f"{text} {unit}" if unit else text


def _values(values: object) -> list[object]:
    """The elements of a scalar, sequence or array, flattened (a scalar is one element)."""
    tolist = getattr(values, "tolist", None)
    if tolist is not None:
        values = tolist()  # numpy arrays and scalars: Python numbers
    if isinstance(values, list | tuple):
        out: list[object] = []
        for v in values:
            out.extend(_values(v))
        return out
    return [values]
