"""diffseg.host_memory: freed buffers are reused instead of page-faulted in again."""

from __future__ import annotations

import subprocess
import sys

import pytest

# Allocates, touches and frees a 64 MiB buffer twice; prints the page faults of the second round.
# malloc/memset/free through ctypes: numpy would ask for transparent huge pages and blur the count.
SCRIPT = """
import ctypes, resource
from diffseg.host_memory import reuse_freed_memory
print(reuse_freed_memory())
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
n = 64 * 2**20
for _ in range(2):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    p = libc.malloc(n)
    ctypes.memset(p, 1, n)
    libc.free(p)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _run(env_value: str | None) -> tuple[bool, int]:
    env = {"PATH": "/usr/bin:/bin"}
    if env_value is not None:
        env["DIFFSEG_MALLOC"] = env_value
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, check=True)
    applied, faults = out.stdout.split()
    return applied == "True", int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning is Linux-only")
def test_reuse_freed_memory_avoids_page_faults_on_reallocation():
    applied, faults = _run(None)
    assert applied
    assert faults < 1000  # the 64 MiB (16 384 pages) come back from the heap
    applied, faults = _run("default")
    assert not applied
    assert faults > 10_000  # glibc's default: mmap on allocate, munmap on free, fault every page again
