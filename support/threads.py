"""How long OpenMP's threads wait at a barrier, set before torch loads its OpenMP runtime: every command
imports this module first (libgomp reads the settings once, when it is loaded).

libgomp's threads spin 300,000 rounds at each barrier by default before they sleep. Alone on the machine
that saves a little latency; beside another process using the same cores (a server next to an evaluation,
two trainings, a quickstart next to an editor) the spinning threads take the cores the other process's
threads need, and both slow down several times over. A short spin keeps one process alone as fast, and
lets two share the cores (bench/cpu.py measures both). What the user set (OMP_WAIT_POLICY,
GOMP_SPINCOUNT) wins.
"""

import os

SPIN = "1000"  # rounds a waiting thread spins before it sleeps

if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", SPIN)
