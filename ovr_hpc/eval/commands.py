"""The `ovr-hpc behaviors` and `ovr-hpc plot` subcommands (`ovr-hpc eval` is a stage: ovr_hpc.cli.run_stage).

    ovr-hpc behaviors RESPONSES.jsonl --judge-url URL --judge-model NAME [--api-key-env VAR] [options]
    ovr-hpc behaviors RESPONSES.jsonl --keyword          offline estimate, labelled as such
    ovr-hpc plot RUN_DIR [RUN_DIR ...] [--out DIR] [--smooth 0.9] [--metric KEY ...]
"""

from __future__ import annotations

import argparse
import os
import sys


def add_parsers(sub) -> None:
    """Register `behaviors` and `plot` on the `ovr-hpc` subparsers."""
    p = sub.add_parser("behaviors", help="count cognitive behaviours in eval responses (judge endpoint or keywords)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("responses", help="an eval's samples.jsonl (or any JSONL with a 'response' field)")
    p.add_argument("--judge-url", help="OpenAI-compatible base URL, e.g. http://host:8000/v1")
    p.add_argument("--judge-model", help="model name the endpoint serves")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY",
                   help="environment variable holding the API key (default OPENAI_API_KEY; unset = no key)")
    p.add_argument("--keyword", action="store_true", help="offline keyword estimate instead of a judge")
    p.add_argument("--out", help="output folder (default: beside the responses)")
    p.add_argument("--behavior", action="append", default=[], help="only this behaviour (repeatable)")
    p.add_argument("--benchmark", action="append", default=[], help="only responses of this benchmark label")
    p.add_argument("--limit", type=int, help="first N responses only")
    p.add_argument("--step", type=int, help="checkpoint step to record (default: the responses' model_step)")
    p.add_argument("--concurrency", type=int, default=8, help="parallel judge requests")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per judge request")
    p.add_argument("--retries", type=int, default=3, help="retries per judgment after the first try")
    p.add_argument("--max-tokens", type=int, default=1024, help="judge answer budget")
    p.set_defaults(func=behaviors_command)

    p = sub.add_parser("plot", help="training curves and behaviour rates over checkpoints (PNGs, runs overlaid)")
    p.add_argument("run_dirs", nargs="+", help="run output_dirs (or folders holding several)")
    p.add_argument("--out", default=None, help="output folder (default: RUN_DIR/plots for one run, ./plots else)")
    p.add_argument("--smooth", type=float, default=0.0, help="EMA smoothing in [0, 1) (0 = raw)")
    p.add_argument("--metric", action="append", default=[], help="also plot this metrics.jsonl key (repeatable)")
    p.set_defaults(func=plot_command)


def behaviors_command(args) -> int:
    from ovr_hpc.eval.behaviors import JudgeClient, JudgeConfigError, analyze

    if args.keyword:
        report = analyze(args.responses, args.out, "keyword", behaviors=args.behavior, benchmarks=args.benchmark,
                         limit=args.limit, step=args.step)
    else:
        if not args.judge_url or not args.judge_model:
            print("ovr-hpc behaviors: give --judge-url and --judge-model, or --keyword for the offline estimate",
                  file=sys.stderr)
            return 2
        judge = JudgeClient(args.judge_url, args.judge_model, os.environ.get(args.api_key_env) or None,
                            timeout_s=args.timeout, max_retries=args.retries, max_tokens=args.max_tokens)
        try:
            report = analyze(args.responses, args.out, "judge", judge=judge, behaviors=args.behavior,
                             benchmarks=args.benchmark, limit=args.limit, concurrency=args.concurrency,
                             step=args.step)
        except JudgeConfigError as e:
            print(f"ovr-hpc behaviors: {e}", file=sys.stderr)
            return 2
    failed = sum(b["failed"] for b in report["behaviors"].values())
    if failed:
        print(f"[behaviors] {failed} judgments failed after retries (counted per kind in the report; rerun to retry)")
    return 0


def plot_command(args) -> int:
    from ovr_hpc.eval.plots import plot_runs

    out = args.out or (os.path.join(args.run_dirs[0], "plots") if len(args.run_dirs) == 1 else "plots")
    written = plot_runs(args.run_dirs, out, smooth=args.smooth, extra_metrics=tuple(args.metric))
    return 0 if written else 1
