"""`ovr-hpc` command line: parse, validate the config, call one entry point.

    ovr-hpc coldstart|rl CONFIG [key=value ...]   train (one process per rank: srun / torchrun / submitit)
    ovr-hpc eval CONFIG [key=value ...]           evaluate a model or checkpoint on benchmarks (ranks split them)
    ovr-hpc behaviors RESPONSES.jsonl [options]   cognitive behaviours in eval responses (judge or --keyword)
    ovr-hpc plot RUN_DIR [RUN_DIR ...]            training curves, behaviour rates over checkpoints (PNGs)
    ovr-hpc check STAGE CONFIG [key=value ...]    every pre-run check; print the run resolved (no torch import)
    ovr-hpc plan CONFIG --nodes N --gpus-per-node G --gpu NAME   memory, disk, tokens and time per step (no torch)
    ovr-hpc submit STAGE CONFIG [options] [key=value ...]   submit through submitit
    ovr-hpc data check FILE [FILE ...]            report malformed records without training
    ovr-hpc data passrate CONFIG [key=value ...]  RL records' pass rates under the current model (ranks split them)
    ovr-hpc data loss-scores CONFIG --out DIR     cold-start samples' mean token loss under a model (ranks split them)
    ovr-hpc data filter FILE... --out KEPT.jsonl  keep a pass-rate band, drop proofs / the highest-loss share
    ovr-hpc grade FILE.jsonl [options]            the RL reward over (response, reference) pairs; audit references
    ovr-hpc export RUN [STEP] OUT_DIR             Hugging Face model from a training checkpoint
    ovr-hpc average CKPT_OR_RUN... --out DIR      (weighted) average of checkpoints' weights, streamed (CPU)
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
from ovr_hpc.run import run_stage  # noqa: F401 - the entry point every launcher ends in (ovr_hpc/run.py)

TRAIN_STAGES = ("coldstart", "rl")
STAGES = TRAIN_STAGES + ("eval",)


def _check(args) -> int:
    from ovr_hpc import preflight

    config = load_config(args.stage, args.config, args.overrides)
    if args.sbatch_script:
        launch = preflight.sbatch_launch(args.sbatch_script, args.sbatch_args or "")
    else:
        launch = preflight.Launch(ranks=args.world_size or None, gpus_per_node=args.gpus_per_node or None,
                                  tasks_per_node=args.tasks_per_node or None)
    result = preflight.check(args.stage, config, launch)
    if args.quiet:
        for note in result.notes:
            print(f"ovr-hpc: note: {note}", file=sys.stderr)
    else:
        print("".join(f"# {line}\n" for line in result.summary()), end="")
        print(dump_config(config), end="")
    return 0


def _data_check(args) -> int:
    import tempfile

    from ovr_hpc.data.records import read_records

    missing = [f for f in args.files if not os.path.isfile(f)]
    if missing:
        print(f"ovr-hpc data check: {', '.join(missing)}: no such file (relative to {os.getcwd()})", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as image_dir:  # for images embedded in Parquet, while they are checked
        records, report = read_records(args.files, kind=args.kind, check_images=True, image_dir=image_dir)
    print(report.format())
    print(f"{len(records)} usable records")
    other = {"sft": "rl", "rl": "sft"}[args.kind]
    if report.num_bad and not records and _looks_like(args.files, other):
        flag = "--kind rl" if other == "rl" else "--kind sft (the default)"
        print(f"ovr-hpc data check: every record is bad as a {args.kind} record, but these look like {other} records "
              f"({'problem / answer' if other == 'rl' else 'messages'}): check them with `ovr-hpc data check {flag} "
              f"{' '.join(args.files)}`", file=sys.stderr)
    return 0 if report.num_bad == 0 else 1


def _looks_like(files: list[str], kind: str) -> bool:
    """The first record of the first JSONL file has the fields of `kind` (rl: problem/question + answer;
    sft: messages/conversations)."""
    import json

    for path in files:
        if not path.endswith((".jsonl", ".json")):
            continue
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.strip():
                    try:
                        record = json.loads(line.lstrip("\ufeff"))
                    except ValueError:
                        return False
                    if not isinstance(record, dict):
                        return False
                    if kind == "rl":
                        return bool({"problem", "question"} & record.keys()) and "answer" in record
                    return bool({"messages", "conversations"} & record.keys())
    return False


def _export(args) -> int:
    from ovr_hpc.checkpoint import export_hf, resolve_checkpoint, step_name

    if len(args.rest) not in (1, 2):
        print("usage: ovr-hpc export CHECKPOINT [STEP] OUT_DIR", file=sys.stderr)
        return 2
    step, out_dir = (None, args.rest[0]) if len(args.rest) == 1 else args.rest
    try:
        source = resolve_checkpoint(args.checkpoint, step)
        export_hf(source, out_dir)
    except (FileNotFoundError, FileExistsError) as e:
        print(f"ovr-hpc export: {e}", file=sys.stderr)
        return 2
    print(f"exported {step_name(source)} ({source}/hf) to {out_dir}")
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


def _add_curation_parsers(data_sub) -> None:
    """`data passrate`, `data loss-scores`, `data filter` (ovr_hpc/data/curation.py)."""
    curation = lambda name: lambda a: getattr(__import__("ovr_hpc.data.curation", fromlist=[name]), name)(a)  # noqa: E731
    q = data_sub.add_parser("passrate", help="k responses per RL record with the current model, graded by the RL "
                            "reward: pass rates (an eval config with records benchmarks; one process per rank)")
    q.add_argument("config", help="eval config: benchmarks=[{name: records, path: RL.jsonl}], sampling.n = k")
    q.add_argument("overrides", nargs="*", help="key.sub=value")
    q.set_defaults(func=curation("passrate_command"))
    q = data_sub.add_parser("loss-scores", help="each cold-start sample's mean token loss under model.path "
                            "(a cold-start config; one process per rank)")
    q.add_argument("config", help="cold-start config: model.path = the scoring model, data.* = the records")
    q.add_argument("overrides", nargs="*", help="key.sub=value")
    q.add_argument("--out", required=True, help="folder of the scores (DIR/loss_scores.jsonl); a rerun continues")
    q.set_defaults(func=curation("loss_scores_command"))
    q = data_sub.add_parser("filter", help="keep records by pass rate, drop proofs or the highest-loss share; "
                            "report by source and reason")
    q.add_argument("files", nargs="+", help="the records (JSONL / Parquet), in the order they were scored")
    q.add_argument("--out", required=True, help="the kept records (JSONL); the report goes to OUT.report.json")
    q.add_argument("--report", help="report path (default OUT.report.json)")
    q.add_argument("--pass-rates", nargs="+", default=[], metavar="FILE", help="passrates.jsonl of `data passrate`")
    q.add_argument("--min-pass-rate", type=float, default=0.0, help="drop records below this pass rate (too hard)")
    q.add_argument("--max-pass-rate", type=float, default=1.0, help="drop records above this pass rate (too easy)")
    q.add_argument("--drop-unsolved", action="store_true", help="drop records no response solved (0/k)")
    q.add_argument("--drop-solved", action="store_true", help="drop records every response solved (k/k)")
    q.add_argument("--drop-proofs", action="store_true",
                   help="drop proof questions without a checkable answer (rule: ovr_hpc/data/curation.py)")
    q.add_argument("--loss-scores", nargs="+", default=[], metavar="FILE", help="loss_scores.jsonl of `data loss-scores`")
    q.add_argument("--drop-highest", type=float, default=0.0, metavar="SHARE",
                   help="drop this share of the scored records with the highest loss (e.g. 0.1)")
    q.add_argument("--by-source", action="store_true", help="--drop-highest within each source, not overall")
    q.set_defaults(func=curation("filter_command"))


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
    p.add_argument("--gpus-per-node", type=int, default=0, help="with --tasks-per-node: no two ranks on one GPU")
    p.add_argument("--tasks-per-node", type=int, default=0, help="ranks per node (the job's --ntasks-per-node)")
    p.add_argument("--sbatch-script", default=None,
                   help="take the ranks from this script's #SBATCH lines and --sbatch-args (the sbatch scripts)")
    p.add_argument("--sbatch-args", default=None, help="the sbatch options given, shell-quoted in one string")
    p.add_argument("--quiet", action="store_true", help="print only errors and notes, not the resolved config")
    p.set_defaults(func=_check)

    p = sub.add_parser("plan", help="memory per GPU and phase, disk, tokens and time per step (no torch import)")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="key.sub=value")
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--gpus-per-node", type=int, required=True)
    p.add_argument("--gpu", required=True, help="h100, h200, a100 or b200")
    p.add_argument("--model", default=None,
                   help="the architecture when model.path is not here: a hub id of the shipped table, a config.json")
    p.add_argument("--mfu", type=float, default=0.35, help="training model-FLOPs utilisation assumed")
    p.add_argument("--decode-efficiency", type=float, default=0.6, help="share of HBM bandwidth decode reaches")
    p.set_defaults(func=lambda a: __import__("ovr_hpc.plan", fromlist=["plan_command"]).plan_command(a))

    p = sub.add_parser("submit", help="submit a stage through submitit (see `ovr-hpc submit -h`)", add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=lambda a: __import__("ovr_hpc.launch", fromlist=["cli_main"]).cli_main(a.rest))

    p = sub.add_parser("data", help="data tools")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    q = data_sub.add_parser("check", help="report malformed records (file:line, counts by kind)")
    q.add_argument("files", nargs="+")
    q.add_argument("--kind", choices=["sft", "rl"], default="sft")
    q.set_defaults(func=_data_check)
    _add_curation_parsers(data_sub)

    p = sub.add_parser("grade", help="grade a JSONL of (response, reference) pairs with the RL reward; verdict counts")
    p.add_argument("file")
    p.add_argument("--response-key", default="response")
    p.add_argument("--reference-key", default="answer")
    p.add_argument("--answer-type-key", default="answer_type")
    p.add_argument("--references-only", action="store_true",
                   help="audit each reference alone: parses, several boxed parts, empty")
    p.add_argument("--out", help="write one verdict per line (JSONL) here")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds per line")
    p.set_defaults(func=lambda a: __import__("ovr_hpc.grading.audit", fromlist=["grade_command"]).grade_command(a))

    p = sub.add_parser("export", help="write a Hugging Face model from a checkpoint")
    p.add_argument("checkpoint", help="OUTPUT_DIR (a run), OUTPUT_DIR/checkpoints/step_N or .../latest")
    p.add_argument("rest", nargs="+", metavar="[STEP] OUT_DIR",
                   help="STEP: step_N, N or latest of the run (default: CHECKPOINT itself, or its latest)")
    p.set_defaults(func=_export)

    p = sub.add_parser("average", help="(weighted) average of checkpoints' Hugging Face weights, streamed (CPU)")
    p.add_argument("inputs", nargs="+", metavar="CKPT_OR_RUN",
                   help="checkpoints (step_N, .../latest), exported folders, or runs with --steps")
    p.add_argument("--out", required=True, help="the averaged model's folder (new or empty)")
    p.add_argument("--weights", nargs="+", metavar="W", help="one per input, in order (default: uniform); normalised")
    p.add_argument("--steps", metavar="A:B:S", help="from each run, checkpoints step_A, step_A+S, ... up to B included")
    p.add_argument("--shard-mb", type=int, default=2048, help="output shard size, and about the memory it needs")
    p.set_defaults(func=lambda a: __import__("ovr_hpc.average", fromlist=["average_command"]).average_command(a))

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
    p.add_argument("--out", default="runs/demo", help="where the models, data, report.json and PNGs go")
    p.add_argument("--nprocs", type=int, default=2, help="local ranks (gloo) each stage trains on")
    p.add_argument("--seed", type=int, default=0, help="seeds the whole pipeline: model init, data, both stages")
    p.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["submit"]:  # its own parser (`ovr-hpc submit --help` included)
        from ovr_hpc.launch import cli_main

        return cli_main(argv[1:])
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
    except FileNotFoundError as e:  # a mistyped input path: its name, not a traceback
        print(f"ovr-hpc: {e.strerror}: {e.filename}" if e.filename else f"ovr-hpc: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
