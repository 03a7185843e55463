"""Progress of long work: a tqdm bar on a terminal, one plain line per logging step elsewhere.

Snakemake sends stderr to a log file, where tqdm's carriage-return refreshes pile up into one
unreadable line; there each :meth:`Progress.log` call writes a line such as
``train 3d-diff: step 40/100 loss=0.4123 lr=1.00e-04 | 2.31 step/s ETA 0:00:26``.
``DIFFSEG_PROGRESS=bar|plain`` forces one or the other.
"""

from __future__ import annotations

import datetime
import os
import sys
import time
from typing import IO, Any

from tqdm import tqdm


def _plain_wanted(stream: IO[str]) -> bool:
    forced = os.environ.get("DIFFSEG_PROGRESS", "").lower()
    if forced in ("bar", "plain"):
        return forced == "plain"
    isatty = getattr(stream, "isatty", None)
    return not (isatty is not None and isatty())


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.2e}" if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5) else f"{value:.4f}"
    return str(value)


class Progress:
    """Counts ``total`` units from ``initial``; ``log(**fields)`` reports the fields of this point."""

    def __init__(
        self, total: int, desc: str, initial: int = 0, unit: str = "step", stream: IO[str] | None = None
    ):
        self.stream = stream if stream is not None else sys.stderr
        self.total, self.desc, self.unit, self.n = int(total), desc, unit, int(initial)
        self.plain = _plain_wanted(self.stream)
        self._start, self._start_n = time.perf_counter(), self.n
        self._bar = None
        if not self.plain:
            self._bar = tqdm(
                total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, mininterval=2.0,
                file=self.stream,
            )  # fmt: skip

    def update(self, n: int = 1) -> None:
        """``n`` more units done."""
        self.n += n
        if self._bar is not None:
            self._bar.update(n)

    def log(self, **fields: Any) -> None:
        """Report this point: the bar's postfix, or one plain line with rate and ETA."""
        if self._bar is not None:
            self._bar.set_postfix({k: _format(v) for k, v in fields.items()})
            return
        now = time.perf_counter()  # the rate since the last line: compilation drops out after one
        elapsed, done = now - self._start, self.n - self._start_n
        rate = done / elapsed if elapsed > 0 and done > 0 else 0.0
        self._start, self._start_n = now, self.n
        eta = (self.total - self.n) / rate if rate > 0 else float("nan")
        text = " ".join(f"{k}={_format(v)}" for k, v in fields.items())
        when = str(datetime.timedelta(seconds=round(eta))) if eta == eta else "?"
        line = f"{self.desc}: {self.unit} {self.n}/{self.total} {text} | {rate:.3g} {self.unit}/s ETA {when}"
        print(line.replace("  ", " "), file=self.stream, flush=True)

    def write(self, text: str) -> None:
        """A message line that does not break the bar."""
        if self._bar is not None:
            self._bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
