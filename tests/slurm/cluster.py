"""A one-node SLURM cluster on this machine, with accounting, for the SLURM tests and CI.

Debian's ``slurm-wlm``, ``slurmdbd``, ``munge`` and ``mariadb-server`` (``.ci/slurm`` installs
them). Everything runs as root in the foreground of processes this module starts, without
systemd or cgroups: ``proctrack/linuxproc``, ``task/none``, ``jobacct_gather/linux``. The node
has fake GPUs (``gres.conf``: ``AutoDetect=off``, plain files as their device files), so a job
that asks for one is scheduled and accounted as a GPU job and then runs on the CPU.

The configuration lives in one directory (``SLURM_CONF`` points at its ``slurm.conf``; slurmdbd
and gres read theirs from beside it). The plugin's job step drops ``SLURM_*`` variables, that one
too, before its ``srun``, which then reads the default ``/etc/slurm/slurm.conf``: so that path is
made a symbolic link to this cluster's file while it runs (never over a real file: then the
cluster does not start), and removed by ``stop``. MariaDB and munged
are the system's (default socket paths, which ``slurmdbd`` and the munge plugin use); they are
started when not running and left running (``Cluster.stop`` ends only the SLURM daemons).

    python tests/slurm/cluster.py up DIR     # start, print the environment to export
    python tests/slurm/cluster.py down DIR   # stop the daemons started by `up`
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

BINARIES = ("slurmctld", "slurmd", "slurmdbd", "sbatch", "sacct", "sacctmgr", "munged", "mariadbd")
SBIN = ("/usr/sbin", "/usr/bin", "/sbin", "/bin")
CLUSTER = "diffseg"
DB_NAME = "diffseg_slurm_acct"
DB_USER = "diffseg_slurm"
DB_PASS = "diffseg-ci-only"  # a throw-away local database user; nothing else uses it
GPU_TYPE = "fake"
SYSTEM_CONF = Path("/etc/slurm/slurm.conf")


class ClusterError(RuntimeError):
    """The cluster could not be started (the message says which step and why)."""


def which(name: str) -> str | None:
    return shutil.which(name) or next(
        (f"{d}/{name}" for d in SBIN if os.access(f"{d}/{name}", os.X_OK)), None
    )


def missing_binaries() -> list[str]:
    """The SLURM/munge/MariaDB programs not installed here (empty when all are)."""
    return [b for b in BINARIES if which(b) is None]


def _run(cmd: list[str], *, check: bool = True, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if check and res.returncode != 0:
        raise ClusterError(f"{' '.join(cmd)} failed ({res.returncode}): {res.stderr.strip() or res.stdout}")
    return res


def _wait(what: str, probe, timeout: float, log: Path | None = None) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if probe():
            return
        time.sleep(0.5)
    tail = log.read_text()[-2000:] if log and log.exists() else ""
    raise ClusterError(f"{what} did not come up in {timeout:.0f} s\n{tail}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mem_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    return 4000


@dataclass
class Cluster:
    """The cluster's files under ``root``; ``start`` brings it up, ``stop`` takes it down."""

    root: Path
    # More CPUs than the machine has (SlurmdParameters=config_overrides): jobs mostly wait on
    # their start-up, so a few at once overlap it; memory is not enforced (no cgroups).
    cpus: int = field(default_factory=lambda: 2 * (os.cpu_count() or 1))
    gpus: int = 2
    mem_mb: int = field(default_factory=lambda: max(1000, int(_mem_mb() * 0.5)))
    node: str = field(default_factory=lambda: socket.gethostname().split(".")[0])
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def conf(self) -> Path:
        return self.root / "etc" / "slurm.conf"

    @property
    def env(self) -> dict[str, str]:
        """The variables that point SLURM's commands (sbatch, sacct, scontrol) at this cluster."""
        return {"SLURM_CONF": str(self.conf)}

    def _environ(self) -> dict[str, str]:
        return {**os.environ, **self.env}

    # -- configuration ---------------------------------------------------------------------
    def write_config(self) -> None:
        etc, var, log = self.root / "etc", self.root / "var", self.root / "log"
        for d in (etc, var / "ctld", var / "d", log):
            d.mkdir(parents=True, exist_ok=True)
        ports = [_free_port() for _ in range(3)]
        self.ports = dict(zip(("ctld", "d", "dbd"), ports, strict=True))
        gres = f"Gres=gpu:{GPU_TYPE}:{self.gpus}"
        self.conf.write_text(
            f"""ClusterName={CLUSTER}
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={self.ports["ctld"]}
SlurmdPort={self.ports["d"]}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=5
SwitchType=switch/none
SlurmdParameters=config_overrides
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
ReturnToService=2
MinJobAge=600
StateSaveLocation={var / "ctld"}
SlurmdSpoolDir={var / "d"}
SlurmctldPidFile={var / "slurmctld.pid"}
SlurmdPidFile={var / "slurmd.pid"}
SlurmctldLogFile={log / "slurmctld.log"}
SlurmdLogFile={log / "slurmd.log"}
SlurmctldDebug=info
SlurmdDebug=info
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort={self.ports["dbd"]}
AccountingStorageTRES=gres/gpu,gres/gpu:{GPU_TYPE}
AccountingStoreFlags=job_comment
JobCompType=jobcomp/none
GresTypes=gpu
NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={self.mem_mb} {gres} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""
        )
        # A GPU needs a device file; plain files stand in (slurmd only opens none of them).
        dev = self.root / "dev"
        dev.mkdir(exist_ok=True)
        for i in range(self.gpus):
            (dev / f"fakegpu{i}").touch()
        files = f"{dev}/fakegpu[0-{self.gpus - 1}]" if self.gpus > 1 else f"{dev}/fakegpu0"
        (etc / "gres.conf").write_text(
            f"AutoDetect=off\nNodeName={self.node} Name=gpu Type={GPU_TYPE} File={files} Count={self.gpus}\n"
        )
        dbd = etc / "slurmdbd.conf"
        dbd.write_text(
            f"""AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort={self.ports["dbd"]}
SlurmUser=root
LogFile={log / "slurmdbd.log"}
PidFile={var / "slurmdbd.pid"}
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser={DB_USER}
StoragePass={DB_PASS}
StorageLoc={DB_NAME}
"""
        )
        dbd.chmod(0o600)

    # -- services shared with the machine (started if down, left running) ---------------------
    def ensure_munge(self) -> None:
        if _run(["munge", "-n"], check=False).returncode == 0:
            return
        key = Path("/etc/munge/munge.key")
        if not key.exists():
            _run([which("mungekey") or "mungekey", "--create"])
        for d in ("/run/munge", "/var/log/munge", "/var/lib/munge"):
            Path(d).mkdir(parents=True, exist_ok=True)
            shutil.chown(d, "munge", "munge")
        shutil.chown(key, "munge", "munge")
        key.chmod(0o400)
        _run(["runuser", "-u", "munge", "--", which("munged")])
        _wait("munged", lambda: _run(["munge", "-n"], check=False).returncode == 0, 20)

    def ensure_mariadb(self) -> None:
        def up() -> bool:
            return _run(["mariadb-admin", "ping"], check=False).returncode == 0

        if not up():
            Path("/run/mysqld").mkdir(parents=True, exist_ok=True)
            shutil.chown("/run/mysqld", "mysql", "mysql")
            if not Path("/var/lib/mysql/mysql").is_dir():
                _run(["mariadb-install-db", "--user=mysql", "--datadir=/var/lib/mysql"], timeout=120)
            log = self.root / "log" / "mariadb.log"
            # Started detached (it is the machine's database, left running for later runs).
            subprocess.Popen(
                [which("mariadbd"), "--user=mysql", f"--log-error={log}"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
            _wait("mariadbd", up, 60, log)
        sql = (
            f"CREATE DATABASE IF NOT EXISTS {DB_NAME};"
            f"CREATE USER IF NOT EXISTS '{DB_USER}'@'localhost' IDENTIFIED BY '{DB_PASS}';"
            f"GRANT ALL ON {DB_NAME}.* TO '{DB_USER}'@'localhost';FLUSH PRIVILEGES;"
        )
        _run(["mariadb", "-u", "root", "-e", sql])

    # -- the SLURM daemons (started here, stopped by stop()) -----------------------------------
    def _spawn(self, name: str, *args: str) -> None:
        out = open(self.root / "log" / f"{name}.out", "w")  # noqa: SIM115 (lives as long as the daemon)
        self.procs[name] = subprocess.Popen(
            [which(name), "-D", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=self._environ(),
            start_new_session=True,
        )

    def _alive(self, name: str) -> bool:
        p = self.procs.get(name)
        if p is not None and p.poll() is not None:
            out = (self.root / "log" / f"{name}.out").read_text()[-2000:]
            raise ClusterError(f"{name} exited ({p.returncode}):\n{out}")
        return True

    def sacctmgr(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return _run(["sacctmgr", "-i", *args], env=self._environ(), check=check)

    def start(self, timeout: float = 90) -> Cluster:
        missing = missing_binaries()
        if missing:
            raise ClusterError(f"not installed: {', '.join(missing)} (.ci/slurm installs them)")
        self.write_config()
        self.link_system_conf()
        self.ensure_munge()
        self.ensure_mariadb()
        env = self._environ()
        self._spawn("slurmdbd")
        _wait(
            "slurmdbd",
            lambda: (
                self._alive("slurmdbd")
                and self.sacctmgr("-n", "list", "cluster", check=False).returncode == 0
            ),
            timeout,
            self.root / "log" / "slurmdbd.log",
        )
        if CLUSTER not in self.sacctmgr("-n", "-P", "list", "cluster", "format=cluster").stdout.split():
            self.sacctmgr("add", "cluster", CLUSTER)
        self.sacctmgr(
            "add", "account", CLUSTER, f"cluster={CLUSTER}", "description=diffseg", "org=ci", check=False
        )
        user = os.environ.get("USER") or "root"
        self.sacctmgr("add", "user", user, f"account={CLUSTER}", f"cluster={CLUSTER}", check=False)
        self._spawn("slurmctld", "-i")  # -i: ignore state left by an earlier cluster in this dir
        _wait(
            "slurmctld",
            lambda: (
                self._alive("slurmctld")
                and _run(["scontrol", "ping"], env=env, check=False).stdout.count("UP") > 0
            ),
            timeout,
            self.root / "log" / "slurmctld.log",
        )
        self._spawn("slurmd", "-N", self.node)

        def idle() -> bool:
            self._alive("slurmd")
            out = _run(["sinfo", "-h", "-N", "-o", "%t"], env=env, check=False).stdout.split()
            return bool(out) and all(s.startswith(("idle", "mix", "alloc")) for s in out)

        _wait("slurmd (node idle)", idle, timeout, self.root / "log" / "slurmd.log")
        return self

    def link_system_conf(self) -> None:
        """Point /etc/slurm/slurm.conf at this cluster's (see the module's doc)."""
        if SYSTEM_CONF.exists() and not SYSTEM_CONF.is_symlink():
            raise ClusterError(f"{SYSTEM_CONF} exists (a real cluster's?): not replacing it")
        if SYSTEM_CONF.is_symlink() and SYSTEM_CONF.exists():
            other = {**os.environ, "SLURM_CONF": str(SYSTEM_CONF.resolve())}
            if "UP" in _run(["scontrol", "ping"], env=other, check=False, timeout=30).stdout:
                raise ClusterError(f"{SYSTEM_CONF} points at another running test cluster: one at a time")
        SYSTEM_CONF.parent.mkdir(parents=True, exist_ok=True)
        SYSTEM_CONF.unlink(missing_ok=True)
        SYSTEM_CONF.symlink_to(self.conf)

    def unlink_system_conf(self) -> None:
        if SYSTEM_CONF.is_symlink() and Path(os.readlink(SYSTEM_CONF)) == self.conf:
            SYSTEM_CONF.unlink()

    def stop(self) -> None:
        for name in ("slurmd", "slurmctld", "slurmdbd"):
            p = self.procs.pop(name, None)
            if p is None or p.poll() is not None:
                continue
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        self.unlink_system_conf()


def _main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("up", "down"):
        print(__doc__, file=sys.stderr)
        return 2
    root = Path(argv[1]).resolve()
    if argv[0] == "up":
        c = Cluster(root).start()
        pids = {n: p.pid for n, p in c.procs.items()}
        (root / "pids").write_text("".join(f"{n} {pid}\n" for n, pid in pids.items()))
        print(f"export SLURM_CONF={c.conf}")
        return 0
    for line in (root / "pids").read_text().splitlines():
        name, pid = line.split()
        try:
            os.kill(int(pid), signal.SIGTERM)
        except ProcessLookupError:
            pass
    Cluster(root).unlink_system_conf()
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
