"""Suite-wide set-up.

Under pytest-xdist (`-n N`) every worker is a process of its own: with torch's default of one OpenMP
thread per core, N workers run N times as many threads as there are cores, and OpenMP's spinning
barriers then make each worker wait on the others (the fast tier ran about 2x slower that way on 2
cores). So each worker gets an equal share of the cores, unless the user chose a thread count.
Set before torch is imported: the subprocesses the tests start inherit it.
"""

import os

_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0") or 0)
if _workers > 1 and "OMP_NUM_THREADS" not in os.environ:
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // _workers))
