#!/usr/bin/env python
"""Submit an evaluation through submitit; the same as `ovr-hpc submit eval ...`.

    python launchers/eval.py CONFIG [key=value ...] [--nodes N] [--gpus-per-node G] [--time 2-00:00:00] ...

From Python: `ovr_hpc.launch.submit("eval", CONFIG, overrides, nodes=N, ...)` returns the submitit job.
"""

import sys

from ovr_hpc.launch import cli_main

if __name__ == "__main__":
    sys.exit(cli_main(["eval", *sys.argv[1:]]))
