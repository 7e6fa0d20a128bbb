#!/usr/bin/env python
"""Submit the cold start through submitit; the same as `ovr-hpc submit coldstart ...`.

    python launchers/coldstart.py CONFIG [key=value ...] [--nodes N] [--gpus-per-node G] [--time 2-00:00:00] ...

From Python: `ovr_hpc.launch.submit("coldstart", CONFIG, overrides, nodes=N, ...)` returns the submitit job.
"""

import sys

from ovr_hpc.launch import cli_main

if __name__ == "__main__":
    sys.exit(cli_main(["coldstart", *sys.argv[1:]]))
