"""One job, its own accelerators: each local train/test job claims its GPUs or TPU chips before JAX starts.

Snakemake's local executor runs several jobs at once but does not tell a job which accelerator is
its own. Every JAX process reserves most of the memory of every GPU it sees, and on a Cloud TPU VM
the first process to open the TPU takes every chip, so a second one cannot start. So a job that
asks for ``n`` devices (``diffseg train --gpus n`` / ``--tpus n``, which the workflow sets from
``compute.{stage}.gpu`` / ``compute.{stage}.tpu``) claims them with an exclusive ``flock`` on one
lock file per device and sees only those. The kernel drops a ``flock`` when its process ends,
however it ends (``kill -9`` included), so a claim can never outlive its job. A job that finds the
devices it needs claimed waits, saying so, until they are released.

The claiming is written once (:func:`claim`); what differs between the platforms is a
:class:`Platform`: where the pool of ids comes from, the lock files' names, which ids a claim may
take together, and the environment a claim sets.

- **GPUs** (:data:`GPU`): ``DIFFSEG_GPUS`` (a comma-separated list of ids; also how tests fake GPUs),
  else the ids of a ``CUDA_VISIBLE_DEVICES`` the user set, else those ``nvidia-smi`` lists. Any
  ``n`` cards; the job sees them through ``CUDA_VISIBLE_DEVICES`` (PCI bus order, as
  ``nvidia-smi`` numbers them). ``--gpus 0`` hides every GPU: the job runs on the CPU.
- **TPU chips** (:data:`TPU`): ``DIFFSEG_TPUS`` (chip ids; how tests fake chips), else one chip per
  device file of this TPU VM (``/dev/accel*``: v2-v4, v5p; ``/dev/vfio/N``: v5e, v6e). ``--tpus all``
  takes every chip of the host, one job at a time (the paper's layout), and sets nothing: libtpu's
  defaults are the whole host. ``--tpus n`` takes a box of ``n`` chips side by side (1, 2 or 4 of a
  2x2 host; also 8 of a 2x4 host) and sets libtpu's per-process settings for non-communicating
  processes on one VM (:func:`tpu_environment`: the chip box, the chip ids, and a port of its own
  derived from the first chip, so two claims held at once never share one). ``--tpus 0`` keeps
  the job off the TPU (``JAX_PLATFORMS=cpu``: libtpu is never loaded) on a TPU VM, and does
  nothing elsewhere, so a config can carry a TPU setting beside ``gpu: 1`` and run on a GPU box.

Under SLURM (``SLURM_JOB_ID``) nothing is claimed: SLURM already gives each job its own cards
(``--gpus``) or its own node (a partition of TPU VMs). Without the platform's devices nothing is
claimed either: the job runs on what JAX finds.
"""

from __future__ import annotations

import argparse
import fcntl
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, MutableMapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from diffseg.accelerators.memory import DEFAULT_MEM_FRACTION, MEM_FRACTION_VAR
from diffseg.errors import ConfigError

POOL_VAR = "DIFFSEG_GPUS"
LOCKS_VAR = "DIFFSEG_GPU_LOCKS"
TPU_POOL_VAR = "DIFFSEG_TPUS"
TPU_LOCKS_VAR = "DIFFSEG_TPU_LOCKS"
ALL = "all"  # --tpus all: every chip of the host
# libtpu's chip box ("x,y,z") of a claim of n chips; v2-v4 and v5p hosts are 2x2 chips, v5e/v6e
# 8-chip hosts 2x4. A box is ids side by side: n consecutive ids starting at a multiple of n.
TPU_BOXES = {1: "1,1,1", 2: "1,2,1", 4: "2,2,1", 8: "2,4,1"}
LIBTPU_DEFAULT_PORT = 8476  # what a process that sets nothing (a whole-host job) listens on
TPU_BASE_PORT = LIBTPU_DEFAULT_PORT + 1  # a partial claim's port: this + its first chip id
_HELD: list[int] = []  # file descriptors of this process's claims: closed only when it exits

Env = MutableMapping[str, str]
Detect = Callable[[], list[str]]


@dataclass(frozen=True)
class Layout:
    """What one claim may take: ``needed`` of ``groups`` (each locked whole), ``whole`` when that is
    every device of the host (nothing to set), ``what`` for the waiting message."""

    groups: list[tuple[str, ...]]
    needed: int
    whole: bool
    what: str


@dataclass(frozen=True)
class Platform:
    """Everything a claim of GPUs or of TPU chips differs in; :func:`claim` does the rest."""

    name: str  # "gpu" | "tpu": the lock files' prefix ("gpu-0.lock") and the option (--gpus / --tpus)
    unit: str  # in messages: "GPU" | "TPU chip"
    pool_var: str  # the ids jobs share, comma-separated (also how tests fake devices)
    locks_var: str  # where the lock files are (default: a folder in the system's temp folder)
    visible_var: str | None  # a user's own choice of devices, which narrows the pool
    id_pattern: str  # one id, as a regular expression
    id_hint: str  # what the ids look like, for the message about a bad pool variable
    detect: Detect  # the ids of this machine's devices ([] without any)
    layout: Callable[[list[str], int | str, Detect], Layout]
    environment: Callable[[list[str], Layout, Env], None]  # what a claim sets
    hide: Callable[[Env, Callable[[], list[str]]], None]  # what --{name}s 0 sets (given the pool)

    @property
    def option(self) -> str:
        """The job's command-line option: ``--gpus`` or ``--tpus``."""
        return f"--{self.name}s"


def lock_dir(env: MutableMapping[str, str] | None = None, platform: Platform | None = None) -> Path:
    """Where the per-device lock files live: one folder on this machine (``/tmp`` is per node), shared
    by every user, so that two users' jobs do not take the same device either."""
    env = os.environ if env is None else env
    platform = GPU if platform is None else platform
    default = Path(tempfile.gettempdir()) / f"diffseg-{platform.name}-locks"
    return Path(env.get(platform.locks_var) or default)


def _make_lock_dir(folder: Path) -> None:
    if not folder.is_dir():
        folder.mkdir(parents=True, exist_ok=True)
        try:  # world-writable and sticky, as /tmp: every user's jobs create their devices' locks here
            folder.chmod(0o1777)
        except OSError:
            pass


def _parse_ids(text: str, where: str, platform: Platform | None = None) -> list[str]:
    platform = GPU if platform is None else platform
    ids = [part.strip() for part in text.split(",") if part.strip()]
    if not all(re.fullmatch(platform.id_pattern, i) for i in ids):
        raise ConfigError(f"{where}={text!r}: expected {platform.id_hint}")
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


def _google_pci_device() -> bool:
    """Whether a PCI device of Google's (vendor 0x1ae0, which makes the TPU chips) is attached."""
    for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
        try:
            if Path(vendor).read_text().strip() == "0x1ae0":
                return True
        except OSError:
            continue
    return False


def _tpu_device_ids(dev: str = "/dev") -> list[str]:
    """This TPU VM's chips, ``"0"`` to ``"n-1"``: one device file per chip, ``accel0..`` (v2-v4, v5p)
    or ``vfio/0..`` (v5e, v6e; counted only beside a Google PCI device, since other machines use
    VFIO too). libtpu numbers the chips 0 to n-1 whatever the files' numbers."""
    chips = [p for p in glob.glob(f"{dev}/accel*") if re.fullmatch(r"accel\d+", Path(p).name)]
    if not chips and _google_pci_device():
        chips = [p for p in glob.glob(f"{dev}/vfio/*") if Path(p).name.isdigit()]
    return [str(i) for i in range(len(chips))]


def device_pool(platform: Platform, env: Env | None = None, detect: Detect | None = None) -> list[str]:
    """The ids jobs share: the platform's ``DIFFSEG_*`` variable, else the user's own choice
    (``CUDA_VISIBLE_DEVICES``), else the machine's devices."""
    env = os.environ if env is None else env
    if env.get(platform.pool_var):
        return _parse_ids(env[platform.pool_var], platform.pool_var, platform)
    if platform.visible_var and env.get(platform.visible_var):
        return _parse_ids(env[platform.visible_var], platform.visible_var, platform)
    return (platform.detect if detect is None else detect)()


def gpu_pool(env: MutableMapping[str, str] | None = None, detect: Detect = _nvidia_smi_ids) -> list[str]:
    """The ids jobs share: ``DIFFSEG_GPUS``, else a user's ``CUDA_VISIBLE_DEVICES``, else nvidia-smi's."""
    return device_pool(GPU, env, detect)


def tpu_pool(env: MutableMapping[str, str] | None = None, detect: Detect = _tpu_device_ids) -> list[str]:
    """The chip ids jobs share: ``DIFFSEG_TPUS``, else one per TPU device file of this VM."""
    return device_pool(TPU, env, detect)


# -- GPUs: any n cards, CUDA_VISIBLE_DEVICES ------------------------------------------------------


def _gpu_layout(pool: list[str], count: int | str, detect: Detect) -> Layout:
    n = len(pool) if count == ALL else int(count)
    if n > len(pool):
        raise ConfigError(
            f"--gpus {n}: this machine has {len(pool)} GPU(s) ({', '.join(pool)}); ask for at most"
            f" {len(pool)} (compute.train.gpu / compute.test.gpu in the config)"
        )
    return Layout([(gpu,) for gpu in pool], n, False, f"{n} free GPU(s)")


def _gpu_environment(ids: list[str], layout: Layout, env: Env) -> None:
    env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
    env["CUDA_VISIBLE_DEVICES"] = ",".join(ids)
    env.setdefault(MEM_FRACTION_VAR, str(DEFAULT_MEM_FRACTION))  # the card is this job's alone


def _gpu_hide(env: Env, pool: Callable[[], list[str]]) -> None:
    env["CUDA_VISIBLE_DEVICES"] = ""  # asked for none: the CPU, as a SLURM job without --gpus


# -- TPU chips: a box of n chips side by side, or the whole host ----------------------------------


def tpu_counts(host_chips: int) -> list[int]:
    """The chip counts a job may ask for on a host of ``host_chips`` chips: boxes that tile it."""
    return [n for n in TPU_BOXES if n <= host_chips and host_chips % n == 0]


def check_tpu_request(value: int | str, host_chips: int, where: str) -> int:
    """The chips a request (``all`` or a count) takes on a host of ``host_chips`` chips (0: no TPU
    here, so any request takes none); ``ConfigError`` naming ``where`` for a count that makes no box."""
    if value == ALL:
        return host_chips
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{where}: {value!r}: expected all or a number of TPU chips (0, 1, 2, 4 or 8)")
    if value not in (0, *TPU_BOXES):
        raise ConfigError(
            f"{where}: {value} TPU chips make no box of a TPU host's chips; ask for 1, 2 or 4 (2x2"
            " hosts: v2, v3, v4, v5p), also 8 (2x4 hosts: v5e, v6e), all (the whole host) or 0 (none)"
        )
    if host_chips and value and value not in tpu_counts(host_chips):
        counts = ", ".join(map(str, tpu_counts(host_chips)))
        raise ConfigError(
            f"{where}: {value} TPU chips: this host has {host_chips}, in boxes of {counts}; ask for one"
            " of them, all (the whole host) or 0 (none)"
        )
    return value if host_chips else 0


def _tpu_layout(pool: list[str], count: int | str, detect: Detect) -> Layout:
    host = detect() or pool  # the host's chips; without device files, the (fake) pool is the host
    n = len(pool) if count == ALL else int(count)
    where = f"--tpus {count} (compute.train.tpu / compute.test.tpu in the config)"
    if n > len(pool):
        raise ConfigError(f"{where}: this machine has {len(pool)} TPU chip(s) ({', '.join(pool)})")
    check_tpu_request(n, len(host), where)
    if n == len(host) and sorted(pool) == sorted(host):
        return Layout([tuple(pool)], 1, True, f"{n} free TPU chips (the whole host)")
    free, top = set(pool), max(int(chip) for chip in host) + 1
    boxes = [tuple(str(c) for c in range(s, s + n)) for s in range(0, top, n)]
    boxes = [box for box in boxes if free.issuperset(box)]
    if not boxes:
        raise ConfigError(f"{where}: no box of {n} chips side by side among chips {', '.join(pool)}")
    return Layout(boxes, 1, False, f"{n} free TPU chip(s)" + (" side by side" if n > 1 else ""))


def tpu_environment(ids: Sequence[str]) -> dict[str, str]:
    """libtpu's settings for a process that uses chips ``ids`` of a TPU VM alone (non-communicating
    processes on one VM): its chip box, one process, the chip ids and a port of its own. Both names
    of the chips and of the port are set, for older and newer libtpu. The port is the base port plus
    the first chip id: two claims held at once hold different chips, so never the same port, and
    never libtpu's default one, which a whole-host job (setting nothing) takes."""
    port = str(TPU_BASE_PORT + int(ids[0]))
    chips = ",".join(ids)
    return {
        # libtpu's machine-wide lock (/tmp/libtpu_lockfile) would stop the second job on the VM;
        # the per-chip claims here already keep jobs apart, chip by chip.
        "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",
        "TPU_CHIPS_PER_PROCESS_BOUNDS": TPU_BOXES[len(ids)],
        "TPU_PROCESS_BOUNDS": "1,1,1",
        "TPU_VISIBLE_CHIPS": chips,
        "TPU_VISIBLE_DEVICES": chips,
        "TPU_PROCESS_PORT": port,
        "TPU_PROCESS_ADDRESSES": f"localhost:{port}",
        "TPU_MESH_CONTROLLER_PORT": port,
        "TPU_MESH_CONTROLLER_ADDRESS": f"localhost:{port}",
    }


def _tpu_environment(ids: list[str], layout: Layout, env: Env) -> None:
    if not layout.whole:  # the whole host: libtpu's defaults are that already
        env.update(tpu_environment(ids))


def _tpu_hide(env: Env, pool: Callable[[], list[str]]) -> None:
    if pool():  # a TPU here: JAX must not load libtpu, which would take every chip
        env["JAX_PLATFORMS"] = "cpu"


GPU = Platform(
    name="gpu", unit="GPU", pool_var=POOL_VAR, locks_var=LOCKS_VAR, visible_var="CUDA_VISIBLE_DEVICES",
    id_pattern=r"\d+|(GPU|MIG)-.*", id_hint="GPU indices or UUIDs separated by commas, e.g. 0,1,2",
    detect=_nvidia_smi_ids, layout=_gpu_layout,
    environment=_gpu_environment, hide=_gpu_hide,
)  # fmt: skip
TPU = Platform(
    name="tpu", unit="TPU chip", pool_var=TPU_POOL_VAR, locks_var=TPU_LOCKS_VAR, visible_var=None,
    id_pattern=r"\d+", id_hint="TPU chip ids separated by commas, e.g. 0,1,2,3",
    detect=_tpu_device_ids, layout=_tpu_layout,
    environment=_tpu_environment, hide=_tpu_hide,
)  # fmt: skip


# -- The claim, written once ----------------------------------------------------------------------


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


def _holders(folder: Path, ids: Sequence[str], prefix: str = "gpu") -> str:
    owners = []
    for dev in ids:
        try:
            owners.append(f"{dev}: pid {(folder / f'{prefix}-{dev}.lock').read_text().strip() or '?'}")
        except OSError:
            owners.append(f"{dev}: ?")
    return ", ".join(owners)


def _lock_groups(folder: Path, prefix: str, layout: Layout) -> list[tuple[str, int]] | None:
    """One attempt: lock ``layout.needed`` whole groups, or give back all it took and return None."""
    got: list[tuple[str, int]] = []
    groups = 0
    for group in layout.groups:
        taken = []
        for dev in group:
            fd = _try_lock(folder / f"{prefix}-{dev}.lock")
            if fd is None:
                break
            taken.append((dev, fd))
        if len(taken) < len(group):
            for _, fd in taken:  # a group only partly free: none of it
                os.close(fd)
            continue
        got.extend(taken)
        groups += 1
        if groups == layout.needed:
            return got
    for _, fd in got:  # not enough: give back what was taken, so two waiting jobs cannot deadlock
        os.close(fd)
    return None


def claim(
    platform: Platform,
    count: int | str,
    env: Env | None = None,
    detect: Detect | None = None,
    poll_seconds: float = 2.0,
    timeout: float | None = None,
    say: Callable[[str], None] = lambda text: print(text, file=sys.stderr, flush=True),
) -> list[str] | None:
    """Claim ``count`` devices (or :data:`ALL`) of ``platform``'s pool for this process alone.

    Sets the platform's environment in ``env`` (default ``os.environ``); must run before JAX starts
    its backend. Returns the claimed ids, or ``None`` when nothing was claimed: under SLURM, or with
    none of the platform's devices on the machine (the job then runs on what JAX finds). ``count`` 0
    keeps the job off the platform (an empty list). Waits while the devices it needs are claimed
    (``timeout`` seconds at most, then ``TimeoutError``).
    """
    env = os.environ if env is None else env
    detect = platform.detect if detect is None else detect
    if count != ALL and (isinstance(count, bool) or not isinstance(count, int) or count < 0):
        raise ConfigError(f"{platform.option} {count}: expected 0 or more {platform.unit}s")
    if count == 0:
        platform.hide(env, lambda: device_pool(platform, env, detect))
        return []
    if env.get("SLURM_JOB_ID"):
        return None  # SLURM already gave this job its own cards (--gpus) or its own node
    pool = device_pool(platform, env, detect)
    if not pool:
        return None
    layout = platform.layout(pool, count, detect)
    folder = lock_dir(env, platform)
    _make_lock_dir(folder)
    start, said = time.monotonic(), False
    while (got := _lock_groups(folder, platform.name, layout)) is None:
        if timeout is not None and time.monotonic() - start > timeout:
            raise TimeoutError(f"no {layout.what} of {', '.join(pool)} within {timeout:.0f} s")
        if not said:
            holders = _holders(folder, pool, platform.name)
            say(f"diffseg: waiting for {layout.what}; claimed by other jobs: {holders}")
            said = True
        time.sleep(poll_seconds)
    _HELD.extend(fd for _, fd in got)
    ids = [dev for dev, _ in got]
    platform.environment(ids, layout, env)
    return ids


def claim_gpus(
    count: int,
    env: MutableMapping[str, str] | None = None,
    detect: Detect = _nvidia_smi_ids,
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
    return claim(GPU, count, env, detect, poll_seconds, timeout, say)


def claim_tpus(
    count: int | str,
    env: MutableMapping[str, str] | None = None,
    detect: Detect = _tpu_device_ids,
    poll_seconds: float = 2.0,
    timeout: float | None = None,
    say: Callable[[str], None] = lambda text: print(text, file=sys.stderr, flush=True),
) -> list[str] | None:
    """Claim ``count`` TPU chips side by side (or ``"all"``: the whole host) of :func:`tpu_pool`.

    A box of chips gets libtpu's per-process settings (:func:`tpu_environment`); the whole host
    (``all``, or a count equal to the host's chips) sets nothing, as one process on the VM.
    ``count`` 0 keeps the job off the TPU (``JAX_PLATFORMS=cpu``) where there is one. Returns the
    claimed chip ids, or ``None`` under SLURM or without a TPU; must run before JAX starts.
    """
    return claim(TPU, count, env, detect, poll_seconds, timeout, say)


def release() -> None:
    """Give back this process's claims (they also go when it exits, however it exits)."""
    while _HELD:
        os.close(_HELD.pop())


release_gpus = release_tpus = release  # one set of claims per process, whatever the platform


def tpu_count(text: str) -> int | str:
    """``--tpus``'s value: ``all`` or a number of chips (0 or more)."""
    if text.strip().lower() == ALL:
        return ALL
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected all or a number of TPU chips") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected all or 0 or more TPU chips")
    return value


def add_gpus_argument(parser: argparse.ArgumentParser) -> None:
    """``--gpus N`` on a job's command line: claim N of this machine's GPUs (:func:`claim_gpus`)."""
    parser.add_argument(
        "--gpus",
        type=int,
        help="claim this many of the machine's GPUs for this job alone, waiting while other jobs hold"
        " them (0: none, run on the CPU; default: every GPU JAX sees). The workflow sets it.",
    )


def add_tpus_argument(parser: argparse.ArgumentParser) -> None:
    """``--tpus N|all`` on a job's command line: claim TPU chips of this VM (:func:`claim_tpus`)."""
    parser.add_argument(
        "--tpus",
        type=tpu_count,
        metavar="N|all",
        help="on a TPU VM, claim this many chips side by side (1, 2, 4, 8) for this job alone, or all"
        " of them, waiting while other jobs hold them (0: keep off the TPU; default: every chip JAX"
        " sees, unclaimed). Without a TPU it does nothing. The workflow sets it.",
    )


def add_device_arguments(parser: argparse.ArgumentParser) -> None:
    """``--gpus`` and ``--tpus``: the accelerators a job claims before JAX starts."""
    add_gpus_argument(parser)
    add_tpus_argument(parser)
