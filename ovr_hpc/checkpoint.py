"""Atomic full-state checkpoints, the `latest` pointer, pruning, resume and Hugging Face export.

Layout of OUTPUT_DIR/checkpoints/:
    step_N/<name>/...          each engine's state as trained (DeepSpeed: sharded model + optimizer +
                               scheduler); name = policy (cold start, RL) and critic (RL)
    step_N/rng_rank{R}.pt      RNG states of every rank (torch CPU/CUDA, python, numpy)
    step_N/train_state.json    step, data position, tokens seen, ... (whatever the loop needs to go on)
    step_N/config.yaml         the config the run was started with
    step_N/hf/                 full Hugging Face weights + processor (what `ovr-hpc export` copies)
    step_N/COMPLETE            written last inside the folder
    step_N/WEIGHTS_ONLY        (checkpoint.keep_every) the engine states and RNG files were removed: hf/,
                               train_state.json and config.yaml remain; exported and averaged, never resumed
    latest -> step_N           symlink, replaced atomically after the folder is complete

A save writes into .tmp_step_N and renames it, then moves `latest`: a crash at any moment leaves the
previous checkpoint usable. Only folders with COMPLETE count; resume takes only those without WEIGHTS_ONLY.

torch and numpy are imported where they are used: `ovr-hpc check` reads checkpoints (whether the latest
one loads on the job's layout) on login nodes, without torch.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil

from ovr_hpc import dist
from ovr_hpc.config import ConfigError

COMPLETE = "COMPLETE"
WEIGHTS_ONLY = "WEIGHTS_ONLY"
# what a checkpoint kept by checkpoint.keep_every holds once it is older than the keep_last newest
WEIGHTS_ONLY_KEEPS = ("hf", "train_state.json", "config.yaml", COMPLETE, WEIGHTS_ONLY)


def checkpoints_dir(output_dir: str) -> str:
    return os.path.join(output_dir, "checkpoints")


def latest_checkpoint(output_dir: str) -> str | None:
    """The newest complete checkpoint a run can resume from: `latest` if valid, else the highest complete
    step_N that is not weights-only."""
    root = checkpoints_dir(output_dir)
    link = os.path.join(root, "latest")
    if os.path.exists(os.path.join(link, COMPLETE)) and not is_weights_only(link):
        return os.path.realpath(link)
    steps = sorted(_complete_steps(root, resumable=True), reverse=True)
    return os.path.join(root, f"step_{steps[0]}") if steps else None


def is_weights_only(checkpoint: str) -> bool:
    """A checkpoint whose engine states were removed (checkpoint.keep_every): hf/ weights, no resume."""
    return os.path.exists(os.path.join(checkpoint, WEIGHTS_ONLY))


def _complete_steps(root: str, resumable: bool = False) -> list[int]:
    """Steps of the complete step_N folders of `root`; with `resumable`, not the weights-only ones."""
    if not os.path.isdir(root):
        return []
    out = []
    for name in os.listdir(root):
        m = re.fullmatch(r"step_(\d+)", name)
        path = os.path.join(root, name)
        if m and os.path.exists(os.path.join(path, COMPLETE)) and not (resumable and is_weights_only(path)):
            out.append(int(m.group(1)))
    return out


def prune_checkpoints(root: str, keep_last: int, keep_every: int = 0, current: int | None = None
                      ) -> tuple[list[int], list[int]]:
    """After a save: the `keep_last` newest complete checkpoints of `root` (and `current`, the one just
    saved) stay whole. Of the older ones, those at a multiple of `keep_every` (> 0) become weights-only (the
    WEIGHTS_ONLY marker first, so that no resume ever picks a half-removed one, then everything but
    WEIGHTS_ONLY_KEEPS goes: engine and optimizer states, RNG files, a universal conversion); the others are
    deleted. One without hf/ (saved with checkpoint.save_hf_weights=false) stays whole rather than become
    a checkpoint without weights. Returns (deleted steps, steps made weights-only now)."""
    steps = sorted(_complete_steps(root))
    whole = set(steps[-keep_last:]) | ({current} if current is not None else set())
    deleted, stripped = [], []
    for step in steps:
        path = os.path.join(root, f"step_{step}")
        if step in whole:
            continue
        if not (keep_every > 0 and step % keep_every == 0):
            shutil.rmtree(path, ignore_errors=True)
            deleted.append(step)
        elif os.path.isdir(os.path.join(path, "hf")) and not is_weights_only(path):
            with open(os.path.join(path, WEIGHTS_ONLY), "w") as f:
                f.write(f"step {step}: engine states removed (checkpoint.keep_every={keep_every}); weights in hf/\n")
            for name in os.listdir(path):
                if name not in WEIGHTS_ONLY_KEEPS:
                    target = os.path.join(path, name)
                    if os.path.isdir(target) and not os.path.islink(target):
                        shutil.rmtree(target, ignore_errors=True)
                    else:
                        os.remove(target)
            stripped.append(step)
    return deleted, stripped


def _keep_every_of(config_yaml: str) -> int:
    """checkpoint.keep_every of a run's config (0 when it has none)."""
    import yaml

    try:
        value = ((yaml.safe_load(config_yaml) or {}).get("checkpoint") or {}).get("keep_every", 0)
        return int(value or 0)
    except (yaml.YAMLError, AttributeError, TypeError, ValueError):
        return 0


def rng_state() -> dict:
    import numpy as np
    import torch

    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import numpy as np
    import torch

    random.setstate(tuple(x if not isinstance(x, list) else tuple(x) for x in state["python"]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


HF_SHARD_BYTES = 4 * 2**30   # safetensors shard size of exported weights


def save_hf_model(named_tensors, model_path: str, out_dir: str, *, write: bool = True,
                  shard_bytes: int = HF_SHARD_BYTES) -> None:
    """Full weights in the Hugging Face layout of `model_path`'s architecture, plus its processor files.

    `named_tensors`: (HF parameter name, full tensor) pairs, e.g. an engine's `iter_full_params()`, which
    every rank must walk (it gathers shards collectively); only the rank with `write` keeps them. That rank
    holds at most one shard (`shard_bytes`) in CPU memory, never the whole model (145 GB at 72B in bf16).
    Files: model.safetensors, or model-0000i-of-0000n.safetensors with model.safetensors.index.json,
    under the released checkpoints' parameter names; config.json records the weights' dtype.
    """
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoProcessor, GenerationConfig

    from ovr_hpc.buckets import size_bounded
    from ovr_hpc.models.loading import checkpoint_name

    if not write:
        for _ in named_tensors:    # still walk it: the gathers inside are collective
            pass
        return
    os.makedirs(out_dir, exist_ok=True)
    shards, total, dtype = [], 0, None

    def flush(shard: dict):
        path = os.path.join(out_dir, f".partial-{len(shards):05d}.safetensors")
        save_file(shard, path, metadata={"format": "pt"})
        shards.append((path, list(shard)))

    def on_cpu(pairs):
        seen = set()
        for name, tensor in pairs:
            key = checkpoint_name(name)
            if key in seen:
                raise ValueError(f"parameter {name!r} ({key}) was produced twice while exporting to {out_dir}")
            seen.add(key)
            yield key, tensor.detach().to("cpu").contiguous()

    def nbytes(pair) -> int:
        return pair[1].numel() * pair[1].element_size()

    for shard in size_bounded(on_cpu(named_tensors), shard_bytes, size=nbytes):
        flush(dict(shard))
        total += sum(map(nbytes, shard))
        if dtype is None:
            dtype = next((t.dtype for _, t in shard if t.is_floating_point()), None)
        shard.clear()   # one shard in memory at a time
    if not shards:
        flush({})
    if len(shards) == 1:
        os.replace(shards[0][0], os.path.join(out_dir, "model.safetensors"))
    else:
        weight_map = {}
        for i, (path, keys) in enumerate(shards, start=1):
            final = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            os.replace(path, os.path.join(out_dir, final))
            weight_map.update(dict.fromkeys(keys, final))
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
    config = AutoConfig.from_pretrained(model_path)
    if dtype is not None:
        config.dtype = dtype
    config.save_pretrained(out_dir)
    AutoProcessor.from_pretrained(model_path).save_pretrained(out_dir)
    try:
        GenerationConfig.from_pretrained(model_path).save_pretrained(out_dir)
    except OSError:
        pass  # the base model has no generation_config.json


def save_checkpoint(engines: dict, output_dir: str, step: int, train_state: dict, config_yaml: str, model_path: str,
                    keep_last: int, save_hf: bool, keep_every: int | None = None, rank_json: dict | None = None) -> str:
    """All ranks call. `engines` maps names to engines; the HF weights are those of engines["policy"].
    rank_json: {name: JSON-able} of this rank, written as name_rank{R}.json (e.g. the partial-rollout buffer).
    Older checkpoints are pruned by `prune_checkpoints` (keep_every: by default checkpoint.keep_every of
    `config_yaml`, the run's config). Returns the final step_N path."""
    import torch

    root = checkpoints_dir(output_dir)
    final = os.path.join(root, f"step_{step}")
    tmp = os.path.join(root, f".tmp_step_{step}")
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    dist.barrier()
    for name, engine in engines.items():
        engine.save(os.path.join(tmp, name), client_state={"train_state": train_state})
    torch.save(rng_state(), os.path.join(tmp, f"rng_rank{rank}.pt"))
    for name, value in (rank_json or {}).items():
        with open(os.path.join(tmp, f"{name}_rank{rank}.json"), "w") as f:
            json.dump(value, f)
    if save_hf:
        save_hf_model(engines["policy"].iter_full_params(), model_path, os.path.join(tmp, "hf"), write=rank == 0)
    if rank == 0:
        with open(os.path.join(tmp, "train_state.json"), "w") as f:
            json.dump(train_state, f, indent=1)
        with open(os.path.join(tmp, "config.yaml"), "w") as f:
            f.write(config_yaml)
    dist.barrier()
    if rank == 0:
        with open(os.path.join(tmp, COMPLETE), "w") as f:
            f.write(f"step {step}\n")
        if os.path.exists(final):  # a re-save of the same step (e.g. final save right after a periodic one)
            shutil.rmtree(final)
        os.replace(tmp, final)
        link_tmp = os.path.join(root, ".latest.tmp")
        if os.path.lexists(link_tmp):
            os.remove(link_tmp)
        os.symlink(f"step_{step}", link_tmp)
        os.replace(link_tmp, os.path.join(root, "latest"))
        prune_checkpoints(root, keep_last, _keep_every_of(config_yaml) if keep_every is None else keep_every, step)
    dist.barrier()
    return final


def end_of_step(step: int, total_steps: int, every_steps: int, stop, save, log) -> str | None:
    """What a loop does at a step boundary: "completed" after the last step (the caller saves), or
    "preempted" once every rank agreed on a stop request and the checkpoint is saved, else None (with
    the periodic save when due). Every rank calls it at the same step."""
    if step == total_steps:
        stop.consume()
        return "completed"
    if stop.agreed():
        return preempted(stop, log, f": saving at step {step}", save)
    if step % every_steps == 0:
        save()
        # A signal during the save (a big model's save takes minutes; scancel gives ~30 s before SIGKILL):
        # this step's checkpoint is complete, so stop now instead of after one more step.
        if stop.agreed():
            return preempted(stop, log, f" during the save at step {step}: stopping")
    return None


def preempted(stop, log, moment: str, save=None) -> str:
    """After the ranks agreed on a stop request: log it, save (when `save` is given), forget the signal;
    returns the run's status, "preempted" (the launchers requeue on it)."""
    log(f"stop requested ({stop.describe()}){moment}")
    if save is not None:
        save()
    stop.consume()
    return "preempted"


def load_checkpoint(engines: dict, path: str) -> dict:
    """All ranks call. Restores every engine's state and this rank's RNG; returns the train state."""
    import torch

    if is_weights_only(path):
        raise RuntimeError(f"{path} holds weights only (checkpoint.keep_every removed its engine states): it cannot "
                           f"be resumed from; start a new run from {os.path.join(path, 'hf')}")
    for name, engine in engines.items():
        if not os.path.isdir(os.path.join(path, name)):
            raise RuntimeError(f"{path} has no state for {name!r} (holds: {sorted(os.listdir(path))})")
        try:
            client_state = engine.load(os.path.join(path, name))
        except Exception as e:
            # a checkpoint damaged after it was completed (a file system losing or truncating files): say
            # which, and how to fall back to an older one, rather than only the loader's own error
            root = os.path.dirname(path.rstrip("/"))
            older = sorted(s for s in _complete_steps(root) if f"step_{s}" != os.path.basename(path.rstrip("/")))
            raise RuntimeError(
                f"cannot load the {name!r} state of {path}: {type(e).__name__}: {e}. To resume from an older "
                f"checkpoint (complete ones: {', '.join(f'step_{s}' for s in older) or 'none'}), move {path} "
                "away; checkpoint.resume=false starts over") from e
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    rng_file = os.path.join(path, f"rng_rank{rank}.pt")
    if os.path.exists(rng_file):
        set_rng_state(torch.load(rng_file, weights_only=False))  # our own file: holds python/numpy state
    else:
        # saved on fewer ranks (both engines load under another layout): the data order and the rollout
        # seeds derive from the seed and the step, so only this rank's generator state is not restored
        print(f"rank {rank}: {path} was saved on fewer ranks: resuming on this layout without a saved RNG "
              "state for this rank", flush=True)
    return client_state["train_state"]


def load_rank_json(checkpoint: str, name: str):
    """This rank's name_rank{R}.json of `checkpoint` (save_checkpoint's rank_json), or None without one."""
    import torch

    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    path = os.path.join(checkpoint, f"{name}_rank{rank}.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def saved_num_ranks(checkpoint: str) -> int:
    """Ranks that saved `checkpoint` (each writes its RNG state)."""
    return len([n for n in os.listdir(checkpoint) if re.fullmatch(r"rng_rank\d+\.pt", n)])


def resume_layout_problem(saved: dict, parallel, saved_world: int, world: int) -> str | None:
    """Why an engine checkpoint saved with the `saved` parallel section (the checkpoint's config.yaml) on
    `saved_world` ranks cannot load with `parallel` on `world` ranks; None when it can.

    Megatron-core's distributed checkpoints reshard to any layout. DeepSpeed converts to its universal
    format for another number of ranks (ZeRO 1-3), but measured here: ZeRO-3 files do not load into
    ZeRO-1/2 or back (1 and 2 share a format), an AutoTP checkpoint does not load at another AutoTP size,
    and its universal conversion fails ("Unused patterns ... while merging tp slices"), so not on another
    number of ranks either."""
    defaults = type(parallel)()   # for keys a config.yaml leaves out
    engine = saved.get("engine", defaults.engine)
    if engine != parallel.engine:
        return f"it was saved by the {engine} engine, this run uses parallel.engine={parallel.engine}"
    if engine != "deepspeed":
        return None
    zero, autotp = saved.get("zero_stage", defaults.zero_stage), saved.get("autotp_size", defaults.autotp_size)
    if (zero == 3) != (parallel.zero_stage == 3):
        return (f"it was saved with parallel.zero_stage={zero}, this run has {parallel.zero_stage}: DeepSpeed "
                "loads ZeRO-3 checkpoints only into ZeRO-3 (1 and 2 are interchangeable)")
    if autotp != parallel.autotp_size:
        return (f"it was saved with parallel.autotp_size={autotp}, this run has {parallel.autotp_size}: DeepSpeed "
                "cannot reshape AutoTP checkpoints")
    if autotp > 1 and saved_world != world:
        return (f"it was saved with AutoTP on {saved_world} ranks, this run has {world}: DeepSpeed's universal "
                "conversion cannot merge AutoTP slices, so an AutoTP run resumes only on its own number of ranks")
    return None


def step_name(checkpoint: str) -> str:
    """step_N of a checkpoint folder (the `latest` link resolved)."""
    return os.path.basename(os.path.realpath(checkpoint).rstrip("/"))


def _step_of(value) -> int | None:
    """N from N, "N" or "step_N"; None for anything else."""
    m = re.fullmatch(r"(?:step_)?(\d+)", str(value).strip())
    return int(m.group(1)) if m else None


def _complete_list(root: str, resumable: bool = False) -> str:
    return ", ".join(f"step_{s}" for s in sorted(_complete_steps(root, resumable))) or "none"


def resume_checkpoint(config) -> str | None:
    """The checkpoint the run resumes from: checkpoint.resume_from when set (step_N / N of OUTPUT_DIR, or a
    step_N folder), else the newest complete one of OUTPUT_DIR; None with checkpoint.resume=false or none
    saved yet. A resume_from that is no complete checkpoint is a ConfigError listing the complete ones."""
    ckpt = config.checkpoint
    if not ckpt.resume:
        return None
    if ckpt.resume_from is None:
        return latest_checkpoint(ckpt.output_dir)
    root = checkpoints_dir(ckpt.output_dir)
    step = _step_of(ckpt.resume_from)
    path = os.path.join(root, f"step_{step}") if step is not None else str(ckpt.resume_from)
    where = root if step is not None else os.path.dirname(os.path.abspath(path).rstrip("/"))
    if os.path.exists(os.path.join(path, COMPLETE)) and is_weights_only(path):
        raise ConfigError(
            f"checkpoint.resume_from = {ckpt.resume_from!r}: {path} holds weights only (checkpoint.keep_every "
            f"removed its engine and optimizer states); resumable ones in {where}: "
            f"{_complete_list(where, resumable=True)}. Name one of them, or start a new run from its weights "
            f"(model.path={os.path.join(path, 'hf')})")
    if os.path.exists(os.path.join(path, COMPLETE)):
        return os.path.realpath(path)
    raise ConfigError(
        f"checkpoint.resume_from = {ckpt.resume_from!r}: {path} is not a complete checkpoint (no {COMPLETE} "
        f"marker); complete ones in {where}: {_complete_list(where)}. Name one of them (checkpoint.resume_from="
        "step_N), or leave checkpoint.resume_from unset to resume from the latest")


# Keys that may differ between a run and the checkpoint it resumes from (prefix match on the dotted key):
# where things are written and logged, how often, how long the run goes on, how the work is laid out over
# the ranks (what a layout cannot load is refused by check_resume_layout), and the engines' speed and
# memory knobs. Any other difference (learning rate, data, seed, model, algorithm, ...) is refused
# unless checkpoint.allow_config_change=true.
RESUME_MAY_CHANGE = (
    "checkpoint.", "logging.", "schedule.max_steps", "schedule.epochs",
    "parallel.engine", "parallel.zero_stage", "parallel.autotp_size", "parallel.offload_optimizer",
    "parallel.tensor_parallel_size", "parallel.pipeline_parallel_size", "parallel.sequence_parallel",
    "parallel.megatron_spec", "parallel.micro_batch_size",
    "model.attn_implementation", "model.gradient_checkpointing", "data.cache_dir", "data.max_bad_fraction",
    "algorithm.max_tokens_per_microbatch", "algorithm.reward_workers", "algorithm.reward_timeout_s",
    "rollout.engine", "rollout.batch_size", "rollout.tensor_parallel_size", "rollout.gpu_memory_utilization",
    "rollout.max_num_batched_tokens", "rollout.enable_sleep_mode", "rollout.sleep_level", "rollout.max_num_seqs",
    "rollout.weight_bucket_mb", "rollout.enforce_eager", "rollout.kv_cache_mb", "rollout.vllm_allow_cpu",
)


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        full = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(_flatten(value, full + "."))
        else:
            out[full] = value
    return out


def config_changes(saved: dict, current: dict) -> list[tuple[str, object, object]]:
    """(key, saved value, current value) for every key both configs hold with different values that is not
    one of RESUME_MAY_CHANGE; keys a config.yaml leaves out (an older version) are not compared."""
    old, new = _flatten(saved), _flatten(current)
    changed = []
    for key in sorted(old.keys() & new.keys()):
        if old[key] != new[key] and not key.startswith(RESUME_MAY_CHANGE):
            changed.append((key, old[key], new[key]))
    return changed


def _saved_config(checkpoint: str) -> dict:
    import yaml

    path = os.path.join(checkpoint, "config.yaml")
    try:
        with open(path) as f:
            saved = yaml.safe_load(f) or {}
        if not isinstance(saved, dict):
            raise AttributeError("not a mapping")
        return saved
    except (OSError, yaml.YAMLError, AttributeError) as e:
        raise ConfigError(f"cannot resume from {checkpoint}: its config {path} is unreadable ({e}); "
                          "checkpoint.resume=false starts over") from None


def check_resume_config(config) -> str | None:
    """ConfigError when the run would resume with a config that differs from the checkpoint's in keys that
    may not change on resume, unless checkpoint.allow_config_change; returns a note naming the differences
    when they are allowed (None when there are none)."""
    import dataclasses

    checkpoint = resume_checkpoint(config)
    if checkpoint is None:
        return None
    current = dataclasses.asdict(config)
    changed = config_changes(_saved_config(checkpoint), current)
    if not changed:
        return None
    listed = "; ".join(f"{key}: {old!r} in the checkpoint, {new!r} now" for key, old, new in changed)
    if config.checkpoint.allow_config_change:
        return (f"resuming from {checkpoint} with a changed config (checkpoint.allow_config_change=true): {listed}. "
                "The optimizer, scheduler and data position are the checkpoint's")
    raise ConfigError(
        f"resuming from {checkpoint} with a config that differs from its config.yaml: {listed}. The optimizer, "
        "scheduler and data position would be the checkpoint's, so the run would not be the one this config "
        "describes. Put the checkpoint's values back; or resume anyway with checkpoint.allow_config_change=true; "
        "or start a new run (another checkpoint.output_dir, or checkpoint.resume=false). Keys that may change on "
        "resume: " + ", ".join(k.rstrip(".") + ("*" if k.endswith(".") else "") for k in RESUME_MAY_CHANGE
                               if any(key.startswith(k) for key in _flatten(current))))


def check_resume_layout(config, world_size: int) -> None:
    """ConfigError when the run would resume (checkpoint.resume and a complete checkpoint) from a checkpoint
    that cannot load on this layout: before any data or model is loaded, and in `ovr-hpc check` before a
    job starts. The message names the checkpoint and the ways out."""
    checkpoint = resume_checkpoint(config)
    if checkpoint is None:
        return
    saved = _saved_config(checkpoint).get("parallel") or {}
    if not isinstance(saved, dict):
        saved = {}
    problem = resume_layout_problem(saved, config.parallel, saved_num_ranks(checkpoint), world_size)
    if problem:
        raise ConfigError(
            f"cannot resume from {checkpoint}: {problem}. Resume with the layout it was saved with, or start a "
            f"new run (another checkpoint.output_dir) from its weights: `ovr-hpc export {checkpoint} DIR`, then "
            "model.path=DIR")


def resolve_checkpoint(path: str, step: int | str | None = None) -> str:
    """A complete step_N folder from OUTPUT_DIR, OUTPUT_DIR/checkpoints, .../latest or .../step_N; with `step`
    (N, "step_N" or "latest") that step of the run at `path`. An unknown or incomplete step is an error
    listing the complete ones, never another checkpoint."""
    path = path.rstrip("/") or "/"
    root = path if os.path.basename(path) == "checkpoints" else checkpoints_dir(path)
    if step is not None and str(step) != "latest":
        n = _step_of(step)
        if n is None:
            raise FileNotFoundError(f"step {step!r}: expected step_N, N or latest")
        if not os.path.isdir(root):
            raise FileNotFoundError(f"{path} is not a run folder (no checkpoints/ inside)")
        found = os.path.join(root, f"step_{n}")
        if not os.path.exists(os.path.join(found, COMPLETE)):
            raise FileNotFoundError(
                f"{path} has no complete checkpoint step_{n}; complete ones: {_complete_list(root)}")
        return os.path.realpath(found)
    if step is None and os.path.exists(os.path.join(path, COMPLETE)):
        return os.path.realpath(path)
    if step is None and re.fullmatch(r"step_\d+", os.path.basename(path)):
        parent = os.path.dirname(path)
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {COMPLETE} marker); complete ones in "
                                f"{parent}: {_complete_list(parent)}")
    candidates = (path,) if step is not None else (path, os.path.dirname(path))
    for output_dir in candidates:
        if os.path.basename(output_dir) == "checkpoints":
            output_dir = os.path.dirname(output_dir)
        found = latest_checkpoint(output_dir)
        if found:
            return found
    raise FileNotFoundError(f"no complete checkpoint at {path} (looked for {COMPLETE} markers)")


def export_hf(checkpoint: str, out_dir: str, step: int | str | None = None) -> str:
    """Copy a checkpoint's Hugging Face weights + processor to out_dir (loadable with from_pretrained).
    `step`: which checkpoint of the run at `checkpoint` (default: `checkpoint` itself, or its latest)."""
    src = os.path.join(resolve_checkpoint(checkpoint, step), "hf")
    if not os.path.isdir(src):
        raise FileNotFoundError(
            f"{src} does not exist: the run was saved with checkpoint.save_hf_weights=false; "
            "resume it for one step with checkpoint.save_hf_weights=true to write the weights"
        )
    if os.path.exists(out_dir) and os.listdir(out_dir):
        raise FileExistsError(f"{out_dir} exists and is not empty")
    shutil.copytree(src, out_dir, dirs_exist_ok=True)
    return out_dir
