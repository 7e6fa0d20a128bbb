"""Every check a run needs before it starts, in one order, for every caller.

The config's own `validate()` (ovr_hpc/config.py, run by `load_config`) checks what the YAML says on its
own. Everything that looks at the world is here:

    1. model    model.path (and critic.path): a local Hugging Face model folder with its config, weights and
                processor; not a shipped placeholder (/path/to/...); not a training run (RL and the cold start
                need `ovr-hpc export` first); a hub id is read from this machine's Hugging Face cache, or
                its sizes from KNOWN_ARCHITECTURES (a note says the ranks will download it)
    2. data     data.train_files exist (eval: data_root)
    3. layout   tensor / pipeline parallel sizes against the model's heads, KV heads and layers; when the
                model's sizes are unknown, a note says what was not checked
    4. world    with the job's ranks: the batch over the data-parallel ranks (with node counts that work),
                and ranks per node against GPUs per node (two ranks on one GPU)
    5. resume   the checkpoint the run resumes from (checkpoint.resume_from or the latest): complete,
                its config against this one (changed keys refused unless checkpoint.allow_config_change),
                loadable on this layout
    6. here     only where the run starts (`at_start`, every rank): this machine can run the rollout
                engine (vLLM: a GPU, or the CPU test build)

The first failure raises `PreflightError` (a ConfigError: the CLI prints it as a config error, exit 2),
whose message names the key, file or flag and the fix. What passes with a caveat becomes a note on the
returned `Preflight`. No torch import: `ovr-hpc check` and the sbatch scripts run this on login nodes.

Callers: `ovr-hpc check` (and through it the sbatch scripts, on the login node with the job's ranks read
from the sbatch options, and inside the job with SLURM_NTASKS), `launch.submit` / `ovr-hpc submit`, and
each trainer's first lines (`at_start`).
"""

from __future__ import annotations

import glob
import json
import os
import re
import shlex
from dataclasses import dataclass, field
from typing import Any, Optional

from ovr_hpc import checkpoint as ckpt
from ovr_hpc.config import STAGES, ConfigError
from ovr_hpc.models.sizes import KNOWN_ARCHITECTURES  # noqa: F401 - the released sizes (one table, also plan's)


class PreflightError(ConfigError):
    """A run that would fail: the message names the key, file or flag and the fix; `check` is the step."""

    def __init__(self, message: str, check: str = "") -> None:
        super().__init__(message)
        self.check = check


PLACEHOLDER = "/path/to"
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


@dataclass
class Launch:
    """How the job is laid out, as far as the caller knows it (None: not known)."""

    ranks: Optional[int] = None
    nodes: Optional[int] = None
    tasks_per_node: Optional[int] = None
    gpus_per_node: Optional[int] = None
    flags: str = "sbatch"
    """Whose flags the messages name: sbatch (--nodes, --ntasks-per-node, --gpus-per-node) or submit
    (ovr-hpc submit: --nodes, --tasks-per-node, --gpus-per-node)."""

    def flag(self, what: str) -> str:
        names = {"sbatch": {"tasks": "--ntasks-per-node", "gpus": "--gpus-per-node", "nodes": "--nodes"},
                 "submit": {"tasks": "--tasks-per-node", "gpus": "--gpus-per-node", "nodes": "--nodes"}}
        return names[self.flags][what]


@dataclass
class Preflight:
    """What the checks found: the stage, its config, the job's layout, the checkpoint the run resumes from,
    the model's sizes (when known) and notes (caveats, what could not be checked)."""

    stage: str
    config: Any
    launch: Launch = field(default_factory=Launch)
    resume_from: Optional[str] = None
    model_dims: Optional[dict] = None
    notes: list[str] = field(default_factory=list)

    def summary(self) -> list[str]:
        """The resolved run in a few lines (`ovr-hpc check` prints them, as YAML comments)."""
        return resolved_summary(self)


# ----------------------------------------------------------------------------- entry points


def check(stage: str, config, launch: Launch | None = None, *, here: bool = False) -> Preflight:
    """Every check in order (see the module docstring); raises PreflightError at the first failure."""
    result = Preflight(stage, config, launch or Launch())
    steps = [("model", _check_model), ("data", _check_data), ("layout", _check_layout),
             ("world", _check_world), ("resume", _check_resume)]
    if here:
        steps.append(("here", _check_here))
    for name, step in steps:
        try:
            step(result)
        except PreflightError:
            raise
        except ConfigError as e:
            raise PreflightError(str(e), name) from None
    return result


def at_start(config, world_size: int) -> Preflight:
    """The stage's first call on every rank, once the ranks are known: every check, and this machine's."""
    stage = stage_of(config)
    return check(stage, config, Launch(ranks=world_size), here=True)


def stage_of(config) -> str:
    for name, cls in STAGES.items():
        if type(config) is cls:
            return name
    raise ValueError(f"not a stage config: {type(config).__name__}")


# ----------------------------------------------------------------------------- 1. model


def _check_model(result: Preflight) -> None:
    cfg, stage = result.config, result.stage
    _no_placeholder(cfg, "model.path", cfg.model.path)
    if stage == "eval":
        _no_placeholder(cfg, "data_root", getattr(cfg, "data_root", ""))
        _no_placeholder(cfg, "output_dir", getattr(cfg, "output_dir", ""))
        result.model_dims = _eval_model(result, cfg.model.path)
        return
    _no_placeholder(cfg, "checkpoint.output_dir", cfg.checkpoint.output_dir)
    result.model_dims = _model_dir(result, "model.path", cfg.model.path, needs_processor=True)
    critic = getattr(cfg, "critic", None)
    if critic is not None and critic.path and getattr(cfg.algorithm, "advantage", "gae") == "gae":
        _no_placeholder(cfg, "critic.path", critic.path)
        _model_dir(result, "critic.path", critic.path, needs_processor=False)


def _no_placeholder(cfg, key: str, value) -> None:
    if isinstance(value, str) and PLACEHOLDER in value:
        raise PreflightError(f"{key} = {value!r} is the shipped config's placeholder: set {key}=... to your own "
                             "path (on the command line or in the YAML)", "model")


def _training_output(path: str) -> Optional[str]:
    """The run folder when `path` is a training run, its checkpoints/ folder or one checkpoint; else None."""
    path = os.path.abspath(path).rstrip("/")
    if os.path.isdir(os.path.join(path, "checkpoints")):
        return path
    if os.path.basename(path) == "checkpoints":
        return os.path.dirname(path)
    if os.path.exists(os.path.join(path, ckpt.COMPLETE)) or os.path.basename(path) == "latest":
        return os.path.dirname(os.path.dirname(path))
    return None


def _hub_cache() -> str:
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return os.path.join(home, "hub")


def _cached_hub_config(repo_id: str) -> Optional[str]:
    pattern = os.path.join(_hub_cache(), "models--" + repo_id.replace("/", "--"), "snapshots", "*", "config.json")
    found = sorted(glob.glob(pattern))
    return found[-1] if found else None


def text_dims(config: dict) -> dict:
    """The language model's entries of a Qwen2.5-VL config.json (top level merged with text_config)."""
    return {**config, **(config.get("text_config") or {})}


def _read_config(path: str, key: str) -> dict:
    try:
        with open(path) as f:
            return text_dims(json.load(f))
    except (OSError, ValueError) as e:
        raise PreflightError(f"{key}: cannot read {path} ({e})", "model") from None


def _model_dir(result: Preflight, key: str, path: str, needs_processor: bool) -> Optional[dict]:
    """The model's sizes after checking that `path` is a model the trainers can load (None: not known)."""
    if not os.path.exists(path):
        return _hub_model(result, key, path)
    run = _training_output(path)
    if run is not None:
        latest = ckpt.latest_checkpoint(run)
        step = ckpt.step_name(latest) if latest else "step_N"
        raise PreflightError(
            f"{key} = {path!r} is a training run (or one of its checkpoints), not a Hugging Face model folder: "
            f"export its weights first, `ovr-hpc export {run} {step} OUT` (any complete step; without it the "
            f"latest), then {key}=OUT", "model")
    if not os.path.isdir(path):
        raise PreflightError(f"{key} = {path!r} is a file: expected a Hugging Face model folder", "model")
    files = set(os.listdir(path))
    if "config.json" not in files:
        raise PreflightError(
            f"{key} = {path!r} is not a Hugging Face model folder: it has no config.json. Point {key} at the "
            "folder that holds config.json and the *.safetensors weights", "model")
    if not any(f.endswith((".safetensors", ".bin")) for f in files):
        raise PreflightError(f"{key} = {path!r} holds no weights (*.safetensors or *.bin next to config.json)",
                             "model")
    if needs_processor:
        if not files & {"preprocessor_config.json", "processor_config.json"}:
            raise PreflightError(
                f"{key} = {path!r} has no processor files (preprocessor_config.json or processor_config.json): "
                "transformers would fail with 'Unrecognized processing class'. A folder written by `ovr-hpc "
                "export` holds them; else copy them (and the tokenizer files) from the base model", "model")
        if not files & {"tokenizer.json", "tokenizer_config.json"}:
            raise PreflightError(f"{key} = {path!r} has no tokenizer (tokenizer.json / tokenizer_config.json): "
                                 "copy the base model's tokenizer files into it", "model")
    return _read_config(os.path.join(path, "config.json"), key)


def _hub_model(result: Preflight, key: str, path: str) -> Optional[dict]:
    if not _HUB_ID.fullmatch(path):
        raise PreflightError(
            f"{key} = {path!r} does not exist (relative to {os.getcwd()}): expected a Hugging Face model folder "
            "(a local copy of Qwen2.5-VL-7B-Instruct, or one written by `ovr-hpc export`)", "model")
    cached = _cached_hub_config(path)
    if cached:
        result.notes.append(f"{key} = {path!r} is a Hugging Face hub id, read from this machine's cache "
                            f"({os.path.dirname(cached)}); the compute nodes need the same cache")
        return _read_config(cached, key)
    download = (f"`huggingface-cli download {path} --local-dir DIR`, then {key}=DIR")
    if path in KNOWN_ARCHITECTURES:
        result.notes.append(
            f"{key} = {path!r} is a Hugging Face hub id not in this machine's cache ({_hub_cache()}): every "
            f"rank downloads it when the run starts, which fails on offline compute nodes ({download}); its "
            "sizes were checked against the shipped table (ovr_hpc/models/sizes.py)")
        return dict(KNOWN_ARCHITECTURES[path])
    raise PreflightError(
        f"{key} = {path!r} does not exist as a local folder, and as a Hugging Face hub id it is neither in this "
        f"machine's cache ({_hub_cache()}) nor a known Qwen2.5-VL size, so nothing about the model could be "
        f"checked: fix the path, or download the model first ({download})", "model")


def _eval_model(result: Preflight, path: str) -> Optional[dict]:
    """eval's model.path may also be a training run or checkpoint (its hf/ weights are evaluated)."""
    if not os.path.exists(path):
        return _hub_model(result, "model.path", path)
    if os.path.isfile(os.path.join(path, "config.json")):
        return _read_config(os.path.join(path, "config.json"), "model.path")
    try:
        found = ckpt.resolve_checkpoint(path)
    except FileNotFoundError as e:
        raise PreflightError(f"model.path = {path!r} is neither a model folder (no config.json) nor a training "
                             f"run with a complete checkpoint ({e})", "model") from None
    hf = os.path.join(found, "hf", "config.json")
    if not os.path.isfile(hf):
        raise PreflightError(f"model.path = {path!r}: its checkpoint {found} holds no hf/ weights (saved with "
                             "checkpoint.save_hf_weights=false)", "model")
    result.notes.append(f"model.path: evaluating {found}/hf")
    return _read_config(hf, "model.path")


# ----------------------------------------------------------------------------- 2. data


def _check_data(result: Preflight) -> None:
    cfg = result.config
    if result.stage == "eval":
        root = getattr(cfg, "data_root", "")
        if root and not os.path.isdir(root):
            raise PreflightError(f"data_root = {root!r} is not a folder (relative to {os.getcwd()}): the folder "
                                 "the benchmarks' paths resolve against", "data")
        return
    for i, path in enumerate(cfg.data.train_files):
        _no_placeholder(cfg, f"data.train_files[{i}]", path)
        if not os.path.isfile(path):
            raise PreflightError(
                f"data.train_files[{i}] = {path!r} does not exist (relative to {os.getcwd()}): fix the path "
                f"(data.train_files=[...]), or check the file with `ovr-hpc data check FILE`", "data")


# ----------------------------------------------------------------------------- 3. layout


def _check_layout(result: Preflight) -> None:
    if result.stage == "eval":
        return
    cfg, dims = result.config, result.model_dims
    par = cfg.parallel
    if par.engine == "megatron":
        what = "parallel.tensor_parallel_size / pipeline_parallel_size against the model's heads and layers"
        needed = True
    else:
        what = "parallel.autotp_size against the model's attention and KV heads"
        needed = par.autotp_size > 1
    if not needed:
        return
    if dims is None or not {"num_attention_heads", "num_key_value_heads"} <= dims.keys():
        result.notes.append(f"not checked: {what} (the model's config.json does not give its heads)")
        return
    paths = [("model.path", cfg.model.path, dims)]
    critic = getattr(cfg, "critic", None)
    if critic is not None and critic.path and os.path.isfile(os.path.join(critic.path, "config.json")):
        paths.append(("critic.path", critic.path, _read_config(os.path.join(critic.path, "config.json"),
                                                                "critic.path")))
    for key, path, text in paths:
        if par.engine == "megatron":
            from ovr_hpc.engines.megatron.layout import validate_megatron_layout  # no torch, no megatron

            try:
                validate_megatron_layout(text, par.tensor_parallel_size, par.pipeline_parallel_size)
            except ConfigError as e:
                raise PreflightError(f"{e} ({key} = {path})", "layout") from None
            continue
        for name in ("num_attention_heads", "num_key_value_heads"):
            if name in text and text[name] % par.autotp_size:
                raise PreflightError(
                    f"parallel.autotp_size ({par.autotp_size}) must divide the model's {name} ({text[name]}, "
                    f"{key} = {path}): each tensor-parallel rank holds whole heads", "layout")


# ----------------------------------------------------------------------------- 4. world


def _check_world(result: Preflight) -> None:
    launch, cfg = result.launch, result.config
    if launch.tasks_per_node and launch.gpus_per_node and launch.tasks_per_node > launch.gpus_per_node:
        raise PreflightError(
            f"{launch.tasks_per_node} ranks per node ({launch.flag('tasks')}) but {launch.gpus_per_node} GPUs per "
            f"node ({launch.flag('gpus')}): ranks would share a GPU. Give {launch.flag('tasks')}="
            f"{launch.gpus_per_node} together with {launch.flag('gpus')}={launch.gpus_per_node}", "world")
    if not launch.ranks:
        return
    try:
        cfg.validate_world(launch.ranks)
    except ConfigError as e:
        where = (f" ({launch.nodes} nodes x {launch.tasks_per_node} ranks)"
                 if launch.nodes and launch.tasks_per_node else "")
        fits = ""
        if launch.tasks_per_node:
            good = [n for n in range(1, 65) if _world_ok(cfg, n * launch.tasks_per_node)][:6]
            if good:
                fits = f"; node counts that work with {launch.tasks_per_node} ranks per node: " + \
                       ", ".join(str(n) for n in good)
        raise PreflightError(f"{e}, for the job's {launch.ranks} ranks{where}{fits}", "world") from None


def _world_ok(cfg, ranks: int) -> bool:
    try:
        cfg.validate_world(ranks)
        return True
    except ConfigError:
        return False


# ----------------------------------------------------------------------------- 5. resume


def _check_resume(result: Preflight) -> None:
    if result.stage == "eval":
        return
    cfg = result.config
    result.resume_from = ckpt.resume_checkpoint(cfg)
    if result.resume_from is None:
        return
    note = ckpt.check_resume_config(cfg)
    if note:
        result.notes.append(note)
    if result.launch.ranks:
        ckpt.check_resume_layout(cfg, result.launch.ranks)
    if cfg.checkpoint.resume_from is not None:
        root = ckpt.checkpoints_dir(cfg.checkpoint.output_dir)
        n = int(ckpt.step_name(result.resume_from)[5:])
        later = sorted(s for s in ckpt._complete_steps(root) if s > n)
        if later:
            result.notes.append(
                f"resuming from step_{n} (checkpoint.resume_from); the later checkpoints "
                f"{', '.join(f'step_{s}' for s in later)} are replaced as the run saves those steps again")


# ----------------------------------------------------------------------------- 6. here


def _check_here(result: Preflight) -> None:
    rollout = getattr(result.config, "rollout", None)
    if rollout is None or rollout.engine != "vllm":
        return
    from ovr_hpc.rollout.vllm import VLLMUnavailableError, check_vllm_available

    allow_cpu = getattr(rollout, "vllm_allow_cpu", False)
    try:
        check_vllm_available(allow_cpu)
    except VLLMUnavailableError as e:
        raise PreflightError(str(e), "here") from None


# ----------------------------------------------------------------------------- the resolved summary


def resolved_summary(result: Preflight) -> list[str]:
    cfg, stage, ranks = result.config, result.stage, result.launch.ranks
    lines = [f"ovr-hpc check {stage}: passed"]
    if stage == "eval":
        lines.append(f"ranks            {ranks or 'not given (--world-size N)'}")
        lines.append(f"benchmarks       {', '.join(b.key for b in cfg.benchmarks)}")
        return lines + [f"note: {n}" for n in result.notes]
    par = cfg.parallel
    mp = par.model_parallel_size
    if ranks:
        dp = ranks // mp
        lines.append(f"ranks            {ranks} = data-parallel {dp} x model-parallel {mp}")
    else:
        dp = None
        lines.append(f"ranks            not given (--world-size N checks the batch over them); model-parallel {mp}")
    if stage == "coldstart":
        rows, seq = par.global_batch_size, cfg.data.max_seq_len
        lines.append(f"per step         {rows} rows of <= {seq} tokens (<= {rows * seq:,} tokens"
                     f"{', packed' if cfg.data.packing else ''})")
        if dp:
            per_rank = rows // dp
            lines.append(f"per rank         {per_rank} rows = accumulation {per_rank // par.micro_batch_size} x "
                         f"micro-batch {par.micro_batch_size}")
        steps = (f"{cfg.schedule.max_steps} (schedule.max_steps)" if cfg.schedule.max_steps else
                 f"ceil({cfg.schedule.epochs:g} epochs x packed rows / {rows}): known once the data is tokenized")
    else:
        ro = cfg.rollout
        n = ro.prompts_per_step * ro.samples_per_prompt
        stages = ", ".join(f"{length} from step {start}" for start, length in ro.max_response_len)
        lines.append(f"per step         {ro.prompts_per_step} prompts x {ro.samples_per_prompt} samples = {n} "
                     f"responses of <= {ro.max_response_len[0][1]} tokens at first (<= "
                     f"{n * (cfg.data.max_prompt_len + ro.max_response_len[0][1]):,} tokens with prompts); "
                     f"response lengths: {stages}")
        if dp:
            lines.append(f"per rank         {ro.prompts_per_step // dp} prompts "
                         f"({ro.prompts_per_step // dp * ro.samples_per_prompt} responses), micro-batches of "
                         f"<= {cfg.algorithm.max_tokens_per_microbatch} tokens")
        steps = (f"{cfg.schedule.max_steps} (schedule.max_steps)" if cfg.schedule.max_steps else
                 f"ceil({cfg.schedule.epochs:g} epochs x prompts / {ro.prompts_per_step}): known once the "
                 "prompts are checked")
    lines.append(f"steps            {steps}")
    c = cfg.checkpoint
    lines.append(f"checkpoints      every {c.every_steps} steps and at the end, newest {c.keep_last} kept, in "
                 f"{ckpt.checkpoints_dir(c.output_dir)}")
    lines.append(f"resume           {result.resume_from or ('off' if not c.resume else 'none yet (a new run)')}")
    if result.model_dims:
        d = result.model_dims
        lines.append(f"model            {cfg.model.path}: {d.get('num_hidden_layers')} layers, "
                     f"{d.get('num_attention_heads')} heads, {d.get('num_key_value_heads')} KV heads")
    return lines + [f"note: {n}" for n in result.notes]


# ----------------------------------------------------------------------------- the sbatch scripts' layout


def sbatch_launch(script: str, args: str | list[str]) -> Launch:
    """The job's layout from a script's #SBATCH defaults overridden by the sbatch options given: what the
    sbatch scripts check on the login node before they submit."""
    defaults = []
    with open(script) as f:
        for line in f:
            if line.startswith("#SBATCH"):
                defaults += shlex.split(line[len("#SBATCH"):], comments=True)
    given = shlex.split(args) if isinstance(args, str) else list(args)
    values: dict[str, str] = {}
    for options in (defaults, given):
        values.update(_sbatch_options(options))
    nodes = _count(values.get("nodes", "1"), "--nodes")
    gpus = values.get("gpus-per-node")
    gpus = _count(gpus.split(":")[-1], "--gpus-per-node") if gpus else None
    tasks = values.get("ntasks-per-node")
    tasks = _count(tasks, "--ntasks-per-node") if tasks else None
    if "ntasks" in values:
        ranks = _count(values["ntasks"], "--ntasks")
    else:
        ranks = nodes * (tasks or 1)
    return Launch(ranks=ranks, nodes=nodes, tasks_per_node=tasks, gpus_per_node=gpus, flags="sbatch")


_SHORT = {"-N": "nodes", "-n": "ntasks", "-G": "gpus"}


def _sbatch_options(options: list[str]) -> dict[str, str]:
    out, i = {}, 0
    while i < len(options):
        opt = options[i]
        if opt.startswith("--") and "=" in opt:
            name, value = opt[2:].split("=", 1)
        elif opt in _SHORT or (opt.startswith("--") and i + 1 < len(options) and not options[i + 1].startswith("-")):
            name, value = _SHORT.get(opt, opt[2:]), options[i + 1] if i + 1 < len(options) else ""
            i += 1
        elif opt[:2] in _SHORT and len(opt) > 2:
            name, value = _SHORT[opt[:2]], opt[2:]
        else:
            name, value = opt.lstrip("-"), ""
        out[name] = value
        i += 1
    return out


def _count(value: str, flag: str) -> int:
    m = re.match(r"(\d+)", str(value))
    if not m or int(m.group(1)) < 1:
        raise PreflightError(f"{flag}={value}: expected a positive number", "world")
    return int(m.group(1))

