"""Errors for bad input: the message always names the file (or key) and the problem."""


class InputError(ValueError):
    """Bad user input (a file, a folder, a config key); the CLI prints it without a traceback."""


class ConfigError(InputError):
    """A config that cannot be resolved: the message names the bad key or value."""


class DataError(InputError):
    """A data file that cannot be used: the message names the file and the problem."""


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
