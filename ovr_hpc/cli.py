"""`ovr-hpc` command line: parse, validate the config, call one entry point.

    ovr-hpc coldstart|rl CONFIG [key=value ...]   train (one process per rank: srun / torchrun / submitit)
    ovr-hpc eval CONFIG [key=value ...]           evaluate a model or checkpoint on benchmarks (ranks split them)
    ovr-hpc behaviors RESPONSES.jsonl [options]   cognitive behaviours in eval responses (judge or --keyword)
    ovr-hpc plot RUN_DIR [RUN_DIR ...]            training curves, behaviour rates over checkpoints (PNGs)
    ovr-hpc check STAGE CONFIG [key=value ...]    validate a config and print it resolved (no torch import)
    ovr-hpc submit STAGE CONFIG [options] [key=value ...]   submit through submitit
    ovr-hpc data check FILE [FILE ...]            report malformed records without training
    ovr-hpc grade FILE.jsonl [options]            the RL reward over (response, reference) pairs; audit references
    ovr-hpc export CHECKPOINT OUT_DIR             Hugging Face model from a training checkpoint
    ovr-hpc tiny-model OUT_DIR                    a random-init tiny Qwen2.5-VL, tokenizer and processor
    ovr-hpc synth-data {sft,rl} OUT.jsonl         synthetic arithmetic reasoning records
    ovr-hpc demo [--out DIR]                      the tiny two-stage pipeline end to end
"""

from __future__ import annotations

import argparse
import os
import sys

import ovr_hpc.eval.config  # noqa: F401 - registers the "eval" stage (no torch import)
from ovr_hpc.config import ConfigError, dump_config, load_config

TRAIN_STAGES = ("coldstart", "rl")
STAGES = TRAIN_STAGES + ("eval",)


def run_stage(stage: str, config_path: str, overrides: list[str]) -> int:
    """The one entry point every launcher ends in (sbatch/srun, submitit, torchrun, local). Returns an exit code."""
    from ovr_hpc import dist

    dist.catch_stop_signals()
    config = load_config(stage, config_path, overrides)
    if stage == "coldstart":
        from ovr_hpc.sft.trainer import train
    elif stage == "rl":
        from ovr_hpc.rl.trainer import train
    elif stage == "eval":
        from ovr_hpc.eval.runner import run_eval as train
    else:  # pragma: no cover - guarded by load_config
        raise ConfigError(f"stage {stage!r} has no trainer")
    try:
        result = train(config)
    finally:
        dist.shutdown()
        dist.ignore_stop_signals()
    if result["status"] == "preempted":
        from ovr_hpc.dist import EXIT_REQUEUE

        return EXIT_REQUEUE
    return 0


def _check(args) -> int:
    config = load_config(args.stage, args.config, args.overrides)
    if args.world_size:
        config.validate_world(args.world_size)
        if args.stage in TRAIN_STAGES:
            from ovr_hpc.checkpoint import check_resume_layout

            check_resume_layout(config, args.world_size)
    if not args.quiet:
        print(dump_config(config), end="")
    return 0


def _data_check(args) -> int:
    import tempfile

    from ovr_hpc.data.records import read_records

    with tempfile.TemporaryDirectory() as image_dir:  # for images embedded in Parquet, while they are checked
        records, report = read_records(args.files, kind=args.kind, check_images=True, image_dir=image_dir)
    print(report.format())
    print(f"{len(records)} usable records")
    return 0 if report.num_bad == 0 else 1


def _export(args) -> int:
    from ovr_hpc.checkpoint import export_hf

    out = export_hf(args.checkpoint, args.out_dir)
    print(f"wrote {out}")
    return 0


def _tiny_model(args) -> int:
    from ovr_hpc.models.tiny import build_tiny_model

    out = build_tiny_model(args.out_dir, seed=args.seed)
    print(f"wrote {out}")
    return 0


def _synth_data(args) -> int:
    from ovr_hpc.data import synthetic

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    write = {"sft": synthetic.write_coldstart_sft, "rl": synthetic.write_arithmetic_rl,
             "rl-color": synthetic.write_color_rl}[args.kind]
    print(f"wrote {write(args.out, args.n, args.seed)}")
    return 0


def _demo(args) -> int:
    from ovr_hpc.demo import run_demo

    run_demo(args.out, nprocs=args.nprocs, seed=args.seed)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ovr-hpc", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    for stage in STAGES:
        p = sub.add_parser(stage, help=f"run the {stage} stage on this rank")
        p.add_argument("config")
        p.add_argument("overrides", nargs="*", help="key.sub=value")
        p.set_defaults(func=lambda a, s=stage: run_stage(s, a.config, a.overrides))

    from ovr_hpc.eval.commands import add_parsers as add_eval_parsers

    add_eval_parsers(sub)  # behaviors, plot

    p = sub.add_parser("check", help="validate a config (no torch import) and print it resolved")
    p.add_argument("stage")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--world-size", type=int, default=0,
                   help="also check the batch layout, and that the latest checkpoint loads, for this many ranks")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_check)

    p = sub.add_parser("submit", help="submit a stage through submitit (see `ovr-hpc submit -h`)", add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=lambda a: __import__("ovr_hpc.launch", fromlist=["cli_main"]).cli_main(a.rest))

    p = sub.add_parser("data", help="data tools")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    q = data_sub.add_parser("check", help="report malformed records (file:line, counts by kind)")
    q.add_argument("files", nargs="+")
    q.add_argument("--kind", choices=["sft", "rl"], default="sft")
    q.set_defaults(func=_data_check)

    p = sub.add_parser("grade", help="grade a JSONL of (response, reference) pairs with the RL reward; verdict counts")
    p.add_argument("file")
    p.add_argument("--response-key", default="response")
    p.add_argument("--reference-key", default="answer")
    p.add_argument("--answer-type-key", default="answer_type")
    p.add_argument("--references-only", action="store_true",
                   help="audit each reference alone: parses, several boxed parts, empty")
    p.add_argument("--out", help="write one verdict per line (JSONL) here")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds per line")
    p.set_defaults(func=lambda a: __import__("ovr_hpc.rl.grade", fromlist=["grade_command"]).grade_command(a))

    p = sub.add_parser("export", help="write a Hugging Face model from a checkpoint")
    p.add_argument("checkpoint", help="OUTPUT_DIR/checkpoints/step_N (or .../latest, or OUTPUT_DIR)")
    p.add_argument("out_dir")
    p.set_defaults(func=_export)

    p = sub.add_parser("tiny-model", help="write a random-init tiny Qwen2.5-VL (HF format)")
    p.add_argument("out_dir")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_tiny_model)

    p = sub.add_parser("synth-data", help="write synthetic arithmetic reasoning records (demo, tests)")
    p.add_argument("kind", choices=["sft", "rl", "rl-color"])
    p.add_argument("out")
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_synth_data)

    p = sub.add_parser("demo", help="tiny cold start (+ RL) end to end on this machine")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--nprocs", type=int, default=2)
    p.add_argument("--seed", type=int, default=0, help="seeds the whole pipeline: model init, data, both stages")
    p.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # key=value overrides after an option (`check CONFIG --world-size 8 a.b=1`) are still overrides
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = list(args.overrides) + extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"ovr-hpc: config error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
