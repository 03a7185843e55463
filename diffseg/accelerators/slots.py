"""One job, its own GPUs: each local train/test job claims whole cards before JAX starts.

Snakemake's local executor runs several jobs at once but does not tell a job which GPU is its
own, and every JAX process reserves most of the memory of every GPU it sees. So a job that asks
for ``n`` GPUs (``diffseg train --gpus n``, which the workflow sets from ``compute.{stage}.gpu``)
claims ``n`` of the machine's cards with an exclusive ``flock`` on one lock file per card and sees
only those (``CUDA_VISIBLE_DEVICES``). The kernel drops a ``flock`` when its process ends, however
it ends (``kill -9`` included), so a claim can never outlive its job. A job that finds every card
claimed waits, saying so, until one is released.

Which cards: ``DIFFSEG_GPUS`` (a comma-separated list of ids; also how tests fake GPUs), else the
ids of a ``CUDA_VISIBLE_DEVICES`` the user set, else those ``nvidia-smi`` lists. Ids are in PCI bus
order (``CUDA_DEVICE_ORDER=PCI_BUS_ID``, as ``nvidia-smi`` numbers them). Under SLURM
(``SLURM_JOB_ID``) nothing is claimed: SLURM already gives each job its own cards (``--gpus``).
``--gpus 0`` hides every GPU, so a job that asked for none runs on the CPU, as under SLURM.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, MutableMapping, Sequence
from pathlib import Path

from diffseg.accelerators.memory import DEFAULT_MEM_FRACTION, MEM_FRACTION_VAR
from diffseg.errors import ConfigError

POOL_VAR = "DIFFSEG_GPUS"
LOCKS_VAR = "DIFFSEG_GPU_LOCKS"
_HELD: list[int] = []  # file descriptors of this process's claims: closed only when it exits


def lock_dir(env: MutableMapping[str, str] | None = None) -> Path:
    """Where the per-card lock files live: one folder on this machine (``/tmp`` is per node), shared
    by every user, so that two users' jobs do not take the same card either."""
    env = os.environ if env is None else env
    return Path(env.get(LOCKS_VAR) or Path(tempfile.gettempdir()) / "diffseg-gpu-locks")


def _make_lock_dir(folder: Path) -> None:
    if not folder.is_dir():
        folder.mkdir(parents=True, exist_ok=True)
        try:  # world-writable and sticky, as /tmp: every user's jobs create their cards' locks here
            folder.chmod(0o1777)
        except OSError:
            pass


def _parse_ids(text: str, where: str) -> list[str]:
    ids = [part.strip() for part in text.split(",") if part.strip()]
    if not all(i.isdigit() or i.startswith(("GPU-", "MIG-")) for i in ids):
        raise ConfigError(f"{where}={text!r}: expected GPU indices or UUIDs separated by commas, e.g. 0,1,2")
    return ids


def _nvidia_smi_ids() -> list[str]:
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=30, check=True,
        ).stdout  # fmt: skip
    except (subprocess.SubprocessError, OSError):  # no driver loaded: no usable GPU either
        return []
    return [line.strip() for line in out.splitlines() if line.strip().isdigit()]


def gpu_pool(
    env: MutableMapping[str, str] | None = None, detect: Callable[[], list[str]] = _nvidia_smi_ids
) -> list[str]:
    """The ids jobs share: ``DIFFSEG_GPUS``, else a user's ``CUDA_VISIBLE_DEVICES``, else nvidia-smi's."""
    env = os.environ if env is None else env
    if env.get(POOL_VAR):
        return _parse_ids(env[POOL_VAR], POOL_VAR)
    if env.get("CUDA_VISIBLE_DEVICES"):
        return _parse_ids(env["CUDA_VISIBLE_DEVICES"], "CUDA_VISIBLE_DEVICES")
    return detect()


def _try_lock(path: Path) -> int | None:
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        if os.fstat(fd).st_uid == os.getuid():
            os.fchmod(fd, 0o666)  # another user's jobs must be able to open it too
        writable = True
    except PermissionError:  # another user's lock file: flock needs no write access
        fd, writable = os.open(path, os.O_RDONLY), False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    if writable:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())  # for the "waiting" message of other jobs
    return fd


def _holders(folder: Path, ids: Sequence[str]) -> str:
    owners = []
    for gpu in ids:
        try:
            owners.append(f"{gpu}: pid {(folder / f'gpu-{gpu}.lock').read_text().strip() or '?'}")
        except OSError:
            owners.append(f"{gpu}: ?")
    return ", ".join(owners)


def claim_gpus(
    count: int,
    env: MutableMapping[str, str] | None = None,
    detect: Callable[[], list[str]] = _nvidia_smi_ids,
    poll_seconds: float = 2.0,
    timeout: float | None = None,
    say: Callable[[str], None] = lambda text: print(text, file=sys.stderr, flush=True),
) -> list[str] | None:
    """Claim ``count`` GPUs of :func:`gpu_pool` for this process and show it only those.

    Sets ``CUDA_VISIBLE_DEVICES`` (and ``CUDA_DEVICE_ORDER``, and the allocator's memory share
    unless the user set it) in ``env`` (default ``os.environ``); must run before JAX starts its
    GPU backend. Returns the claimed ids, or ``None`` when nothing was claimed: under SLURM, or
    with no GPU on the machine (the job then runs on what JAX finds). ``count`` 0 hides all GPUs.
    Waits while every card is claimed (``timeout`` seconds at most, then ``TimeoutError``).
    """
    env = os.environ if env is None else env
    if count < 0:
        raise ConfigError(f"--gpus {count}: expected 0 or more GPUs")
    if count == 0:
        env["CUDA_VISIBLE_DEVICES"] = ""  # asked for none: the CPU, as a SLURM job without --gpus
        return []
    if env.get("SLURM_JOB_ID"):
        return None  # SLURM's --gpus already gave this job its own cards
    pool = gpu_pool(env, detect)
    if not pool:
        return None
    if count > len(pool):
        raise ConfigError(
            f"--gpus {count}: this machine has {len(pool)} GPU(s) ({', '.join(pool)}); ask for at most"
            f" {len(pool)} (compute.train.gpu / compute.test.gpu in the config)"
        )
    folder = lock_dir(env)
    _make_lock_dir(folder)
    start, said = time.monotonic(), False
    while True:
        got: list[tuple[str, int]] = []
        for gpu in pool:
            fd = _try_lock(folder / f"gpu-{gpu}.lock")
            if fd is not None:
                got.append((gpu, fd))
                if len(got) == count:
                    break
        if len(got) == count:
            break
        for _, fd in got:  # not enough: give back what was taken, so two waiting jobs cannot deadlock
            os.close(fd)
        if timeout is not None and time.monotonic() - start > timeout:
            raise TimeoutError(f"no {count} free GPU(s) of {', '.join(pool)} within {timeout:.0f} s")
        if not said:
            say(f"diffseg: waiting for {count} free GPU(s); claimed by other jobs: {_holders(folder, pool)}")
            said = True
        time.sleep(poll_seconds)
    _HELD.extend(fd for _, fd in got)
    ids = [gpu for gpu, _ in got]
    env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
    env["CUDA_VISIBLE_DEVICES"] = ",".join(ids)
    env.setdefault(MEM_FRACTION_VAR, str(DEFAULT_MEM_FRACTION))  # the card is this job's alone
    return ids


def release_gpus() -> None:
    """Give back this process's claims (they also go when it exits, however it exits)."""
    while _HELD:
        os.close(_HELD.pop())


def add_gpus_argument(parser: argparse.ArgumentParser) -> None:
    """``--gpus N`` on a job's command line: claim N of this machine's GPUs (:func:`claim_gpus`)."""
    parser.add_argument(
        "--gpus",
        type=int,
        help="claim this many of the machine's GPUs for this job alone, waiting while other jobs hold"
        " them (0: none, run on the CPU; default: every GPU JAX sees). The workflow sets it.",
    )
