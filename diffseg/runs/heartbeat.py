"""``status.json`` in a run folder: what the process training the run is doing, for ``diffseg status``.

Training rewrites it atomically when it starts, at every logged step, at every checkpoint and
when it ends, with its ``state``:

* ``training``: steps are running (``step`` of ``total``, ``s_per_step`` of the last logging window);
* ``done``: ``total`` steps trained;
* ``interrupted``: SIGTERM/SIGINT arrived and the state was saved at ``step``;
* ``failed``: an error ended it (``message``).

A process killed by SIGKILL (the OOM killer, ``scancel --signal=KILL``, a lost node) cannot say so:
its file still says ``training``. :func:`liveness` then asks whether the process still exists when
it ran on this host, else how long the file has gone without an update. Every file also carries
what the run was trained for (``config_hash``, ``data_fingerprint``, ``run_id``), so a reader can
tell a stale run from the config alone, and the time and devices it used (``seconds``,
``accelerators``: GPUs or TPU devices, 0 on a CPU).

No jax here: ``diffseg status`` reads these files for every run of a campaign in well under 2 s.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from diffseg.io import atomic_write_json

FILE = "status.json"
STATES = ("training", "done", "interrupted", "failed")


def write(run_dir: str | Path, beat: dict[str, Any]) -> None:
    """Replace ``run_dir/status.json`` with ``beat`` and the time it was written (``updated``)."""
    if beat.get("state") not in STATES:
        raise ValueError(f"status.json: state must be one of {STATES}, got {beat.get('state')!r}")
    atomic_write_json(Path(run_dir) / FILE, {**beat, "updated": time.time()})


def read(run_dir: str | Path) -> dict[str, Any] | None:
    """The run's last status, or None when it has none (never trained since the file existed)."""
    path = Path(run_dir) / FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as err:  # written atomically: only a foreign file gets here
        return {"state": "failed", "message": f"{path}: unreadable ({err})"}


def this_process() -> dict[str, Any]:
    """Who is writing: ``host``, ``pid`` and the time this process started its session."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}


def _process_exists(pid: int) -> bool:
    """Whether ``pid`` runs on this host as a Python process (a reused pid of another program is not it)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    cmdline = Path(f"/proc/{pid}/cmdline")
    if cmdline.is_file():
        try:
            text = cmdline.read_bytes().decode(errors="replace").lower()
        except OSError:
            return True
        return "python" in text or "diffseg" in text
    return True


def liveness(beat: dict[str, Any], silent_after_s: float, now: float | None = None) -> tuple[bool, str]:
    """Whether the process of a ``training`` status still runs, and how that is known.

    On this host: whether its pid exists. Elsewhere (a cluster node): whether the file was updated
    in the last ``silent_after_s`` seconds.
    """
    now = time.time() if now is None else now
    age = now - float(beat.get("updated", 0.0))
    if beat.get("host") == socket.gethostname() and beat.get("pid"):
        if _process_exists(int(beat["pid"])):
            return True, f"pid {beat['pid']}"
        return False, f"process {beat['pid']} is gone (killed?)"
    if age <= silent_after_s:
        return True, f"on {beat.get('host', '?')}, updated {age:.0f} s ago"
    return False, f"no update from {beat.get('host', '?')} for {age / 60:.0f} min"


class Heartbeat:
    """The writer side, for one training session: fields set once (who, what run, which devices)
    merged with each :meth:`update`'s; does nothing when not ``enabled`` (processes other than the
    first of a multi-process run)."""

    def __init__(self, run_dir: str | Path, enabled: bool = True, **fields: Any):
        self.run_dir, self.enabled = Path(run_dir), enabled
        self.fields: dict[str, Any] = {**this_process(), **fields}

    def update(self, state: str = "training", **fields: Any) -> None:
        """Record ``fields`` and write the status with ``state``; a failed write (a full disk) is
        not the run's problem and never stops training."""
        self.fields.update(fields, state=state)
        if not self.enabled:
            return
        try:
            write(self.run_dir, self.fields)
        except OSError:
            pass
