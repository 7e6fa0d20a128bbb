"""Evaluation and behaviour analysis (`ovr-hpc eval`, `ovr-hpc behaviors`, `ovr-hpc plot`).

config.py      the eval stage's typed config (registered as stage "eval")
benchmarks.py  adapters: each benchmark's published local layout -> samples, scoring rule, aggregation
runner.py      run_eval: generate, score through the RL reward, resumable, data-parallel, summary tables
behaviors.py   cognitive behaviours in reasoning traces (judge endpoint or keyword estimate), BTR
plots.py       training curves and behaviour rates over checkpoints, several runs overlaid
commands.py    the `behaviors` and `plot` subcommands
"""
