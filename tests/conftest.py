"""Suite-wide set-up.

The suite runs on every core by default (`addopts = "-n auto"` in pyproject.toml, pytest-xdist): one
worker per core, as many as the memory holds (`pytest_xdist_auto_num_workers` below: a worker of the
slow tier peaks at a few GB with a full-size v1 UNet and its reference beside it); one core runs in
process. `-n 0` runs serially in this process (for a debugger), `-n N` chooses.

Under pytest-xdist (`-n N`) every worker is a process of its own: with torch's default of one OpenMP
thread per core, N workers run N times as many threads as there are cores, and OpenMP's spinning
barriers then make each worker wait on the others (the fast tier ran about 2x slower that way on 2
cores). So each worker gets an equal share of the cores, unless the user chose a thread count.
Set before torch is imported: the subprocesses the tests start inherit it.
"""

import os

from ldm.devices import usable_cores  # imports no torch

_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0") or 0)
if _workers > 1 and "OMP_NUM_THREADS" not in os.environ:
    os.environ["OMP_NUM_THREADS"] = str(max(1, usable_cores() // _workers))


GIB_PER_WORKER = 8  # the slow tier's full-size v1 parity tests hold the UNet, its reference and diffusers' copy


def _available_gib():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / (1 << 20)
    except OSError:
        pass
    return None


def pytest_xdist_auto_num_workers(config):
    """`-n auto`: one worker per core this process may run on, no more than the memory holds; 0 (in
    process, no workers) where that leaves one."""
    cores = usable_cores()
    gib = _available_gib()
    workers = cores if gib is None else min(cores, int(gib // GIB_PER_WORKER))
    return workers if workers > 1 else 0
