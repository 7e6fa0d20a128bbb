"""`ovr-hpc average`: a (weighted) average of Hugging Face weights from several checkpoints.

OVR's released model is a uniform average of intermediate RL checkpoints. This writes such an average from

    a checkpoint       OUTPUT_DIR/checkpoints/step_N (or .../latest, or its hf/): its hf/ weights
    an exported folder config.json + *.safetensors (`ovr-hpc export`, or any Qwen2.5-VL folder), as is
    a run + --steps    OUTPUT_DIR with --steps A:B:S: its checkpoints step_A, step_A+S, ... up to B included

into a folder that `from_pretrained` and `AutoProcessor.from_pretrained` load, with `averaged_from.json`
naming the inputs. Before anything is written, every input must be complete (a step_N folder without its
COMPLETE marker is refused), of one architecture (config.json: model_type, architectures and every integer
size), and hold the same tensors with the same shapes and dtypes (an error names the file and the tensor).

Streaming: tensors are read one at a time (`safetensors.safe_open`, lazily from each input's shards),
accumulated in fp32 as a running weighted mean (acc += w_k / (w_1 + ... + w_k) * (x_k - acc), so identical
inputs give bitwise the input back), cast back to the inputs' dtype and handed to the export's shard writer
(`checkpoint.save_hf_model`). Peak memory: one output shard (--shard-mb) plus about three fp32 copies of the
largest tensor (the embedding: 2.2 GB at 7B), never a model; it runs on a login or CPU node
(`slurm/average.sh`). With tie_word_embeddings the output has no lm_head.weight, as the export writes it.
The config, processor, tokenizer and generation config are the first input's.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field

from ovr_hpc.checkpoint import COMPLETE, _complete_list, checkpoints_dir, resolve_checkpoint, save_hf_model

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
METADATA = "averaged_from.json"
DEFAULT_SHARD_MB = 2048
TIED_HEAD = "lm_head.weight"
# config.json entries that may differ between inputs of one architecture (everything else that is an integer
# size, the model type, the architectures and tie_word_embeddings must match)
_CONFIG_MAY_DIFFER = ("dtype", "torch_dtype", "transformers_version", "_name_or_path")


class AverageError(ValueError):
    """Inputs that cannot be averaged; the message names the input, the file and the tensor."""


@dataclass
class Source:
    """One input: the Hugging Face folder read, and where it came from."""

    given: str                    # as named on the command line (with the step for --steps)
    hf_dir: str                   # the folder holding config.json and the safetensors
    checkpoint: str | None = None  # the step_N folder, for a checkpoint
    step: int | None = None
    files: dict[str, str] = field(default_factory=dict)   # tensor name -> safetensors file (in hf_dir)
    config: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------------------- inputs


def parse_steps(text: str) -> list[int]:
    """A:B:S (A, A+S, ... up to B included), A:B (S = 1), or N,N,... -> the steps."""
    text = text.strip()
    if re.fullmatch(r"\d+(,\d+)*", text):
        return [int(s) for s in text.split(",")]
    m = re.fullmatch(r"(\d+):(\d+)(?::(\d+))?", text)
    if not m or int(m.group(3) or 1) <= 0 or int(m.group(1)) > int(m.group(2)):
        raise AverageError(f"--steps {text!r}: expected A:B:S (steps A, A+S, ... up to B included, A <= B, S > 0) "
                           "or N,N,...")
    start, stop, every = int(m.group(1)), int(m.group(2)), int(m.group(3) or 1)
    return list(range(start, stop + 1, every))


def resolve_inputs(paths: list[str], steps: str | None = None) -> list[Source]:
    """The inputs named on the command line, each read only as far as its config and tensor index."""
    sources = []
    for path in paths:
        if steps is None:
            sources.append(_resolve_one(path))
            continue
        if not (os.path.isdir(checkpoints_dir(path)) or os.path.basename(path.rstrip("/")) == "checkpoints"):
            raise AverageError(f"{path}: --steps selects checkpoints of a run folder, and {path} has no "
                               "checkpoints/ folder (name checkpoints or exported folders without --steps)")
        for n in parse_steps(steps):
            try:
                found = resolve_checkpoint(path, n)
            except FileNotFoundError as e:
                raise AverageError(f"--steps {steps}: {e}") from None
            sources.append(_from_checkpoint(f"{path} step_{n}", found))
    seen = {}
    for s in sources:
        key = os.path.realpath(s.hf_dir)
        if key in seen:
            raise AverageError(f"{s.given} and {seen[key]} are the same weights ({key}): name each input once "
                               "(--weights gives one more weight)")
        seen[key] = s.given
    return sources


def _resolve_one(path: str) -> Source:
    p = path.rstrip("/") or "/"
    if not os.path.exists(p):
        raise FileNotFoundError(f"{path}: no such file or folder (relative to {os.getcwd()})")
    parent = os.path.dirname(os.path.abspath(p))
    if os.path.basename(p) == "hf" and re.fullmatch(r"step_\d+", os.path.basename(parent)):
        p = parent   # a checkpoint's hf/: the checkpoint (its COMPLETE marker is checked, its step known)
    base = os.path.basename(os.path.abspath(p))
    if os.path.exists(os.path.join(p, COMPLETE)) or re.fullmatch(r"step_\d+", base) or base == "latest":
        try:
            return _from_checkpoint(path, resolve_checkpoint(p))
        except FileNotFoundError as e:
            raise AverageError(f"{path}: {e} (a checkpoint still being saved has none yet)") from None
    if os.path.isfile(os.path.join(p, "config.json")):
        return _source(path, p)
    if os.path.isdir(checkpoints_dir(p)) or base == "checkpoints":
        run = os.path.dirname(os.path.abspath(p)) if base == "checkpoints" else p
        raise AverageError(f"{path} is a training run: name its checkpoints ({run}/checkpoints/step_N) or select "
                           f"them with --steps A:B:S; complete ones: {_complete_list(checkpoints_dir(run))}")
    raise AverageError(f"{path} is neither a checkpoint (step_N with a {COMPLETE} marker), a training run (with "
                       "--steps) nor a Hugging Face model folder (config.json + *.safetensors)")


def _from_checkpoint(given: str, checkpoint: str) -> Source:
    hf = os.path.join(checkpoint, "hf")
    if not os.path.isdir(hf):
        raise AverageError(f"{given}: {checkpoint} has no hf/ weights (saved with checkpoint.save_hf_weights=false)")
    step = None
    try:
        with open(os.path.join(checkpoint, "train_state.json")) as f:
            step = int(json.load(f)["step"])
    except (OSError, ValueError, KeyError, TypeError):
        m = re.fullmatch(r"step_(\d+)", os.path.basename(checkpoint))
        step = int(m.group(1)) if m else None
    return _source(given, hf, checkpoint, step)


def _source(given: str, hf_dir: str, checkpoint: str | None = None, step: int | None = None) -> Source:
    from safetensors import safe_open

    try:
        with open(os.path.join(hf_dir, "config.json")) as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise AverageError(f"{given}: cannot read {os.path.join(hf_dir, 'config.json')} ({e})") from None
    index = os.path.join(hf_dir, INDEX)
    if os.path.isfile(index):
        try:
            with open(index) as f:
                files = dict(json.load(f)["weight_map"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise AverageError(f"{given}: cannot read {index} ({e})") from None
        for name in sorted(set(files.values())):
            if not os.path.isfile(os.path.join(hf_dir, name)):
                raise AverageError(f"{given}: {index} names {name}, which is missing from {hf_dir}")
    elif os.path.isfile(os.path.join(hf_dir, SINGLE)):
        with safe_open(os.path.join(hf_dir, SINGLE), "pt") as h:
            files = dict.fromkeys(h.keys(), SINGLE)
    else:
        others = sorted(f for f in os.listdir(hf_dir) if f.endswith((".bin", ".pt", ".safetensors")))
        raise AverageError(f"{given}: {hf_dir} has neither {SINGLE} nor {INDEX}"
                           + (f" (only {', '.join(others)}: safetensors are needed)" if others else ""))
    return Source(given, hf_dir, checkpoint, step, files, config)


# ----------------------------------------------------------------------------------------- checks


def _tied(config: dict) -> bool:
    text = config.get("text_config") or {}
    return bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", False)))


def architecture(config: dict, prefix: str = "") -> dict:
    """What must match for two config.json to be one architecture: model_type, architectures,
    tie_word_embeddings and every integer entry (sizes, token ids), nested configs included."""
    out = {}
    for key, value in config.items():
        if key in _CONFIG_MAY_DIFFER:
            continue
        full = prefix + key
        if isinstance(value, dict):
            out.update(architecture(value, full + "."))
        elif key in ("model_type", "architectures", "tie_word_embeddings") or (
                isinstance(value, int) and not isinstance(value, bool)):
            out[full] = value
        elif isinstance(value, list) and value and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            out[full] = value
    return out


def check_compatible(sources: list[Source]) -> list[str]:
    """The tensor names to average (in the first input's order, lm_head.weight left out when the embeddings
    are tied), after checking that every input has the first one's architecture and tensors."""
    first = sources[0]
    arch = architecture(first.config)
    for s in sources[1:]:
        other = architecture(s.config)
        differ = [k for k in sorted(arch.keys() | other.keys()) if arch.get(k) != other.get(k)]
        if differ:
            listed = ", ".join(f"{k}={other.get(k, '(missing)')!r} (not {arch.get(k, '(missing)')!r})"
                               for k in differ[:5])
            raise AverageError(
                f"{s.given} is another architecture than {first.given}: its config.json ({s.hf_dir}) has {listed}"
                f"{', ...' if len(differ) > 5 else ''}; only checkpoints of one model can be averaged")
    tied = _tied(first.config)
    names = [n for n in first.files if not (tied and n == TIED_HEAD)]
    wanted = set(names)
    for s in sources[1:]:
        have = {n for n in s.files if not (tied and n == TIED_HEAD)}
        missing, extra = sorted(wanted - have), sorted(have - wanted)
        if missing or extra:
            said = []
            if missing:
                said.append(f"lacks {len(missing)} tensor(s) of {first.given} ({', '.join(missing[:3])}"
                            f"{', ...' if len(missing) > 3 else ''})")
            if extra:
                said.append(f"has {len(extra)} tensor(s) {first.given} lacks ({', '.join(extra[:3])}"
                            f"{', ...' if len(extra) > 3 else ''})")
            raise AverageError(f"{s.given} ({s.hf_dir}) {' and '.join(said)}")
    with _Readers(sources) as readers:
        reference = {n: _header(readers, 0, n) for n in names}
        for i, s in enumerate(sources):
            for name in names:
                shape, dtype = _header(readers, i, name)
                want = reference[name]
                if (shape, dtype) != want:
                    raise AverageError(
                        f"{os.path.join(s.hf_dir, s.files[name])} ({s.given}): tensor {name} is {dtype} "
                        f"{list(shape)}, in {os.path.join(first.hf_dir, first.files[name])} it is {want[1]} "
                        f"{list(want[0])}; only weights of one shape and dtype can be averaged")
    dtypes = sorted({reference[n][1] for n in names if reference[n][1] not in _INTEGER_DTYPES})
    if len(dtypes) > 1:
        raise AverageError(f"{first.given} holds floating-point tensors of several dtypes ({', '.join(dtypes)}); "
                           "expected one (the output keeps it)")
    return names


_INTEGER_DTYPES = {"BOOL", "U8", "I8", "U16", "I16", "U32", "I32", "U64", "I64"}


def _header(readers, i: int, name: str) -> tuple[tuple, str]:
    piece = readers.handle(i, name).get_slice(name)
    return tuple(piece.get_shape()), piece.get_dtype()


class _Readers(contextlib.ExitStack):
    """Open safetensors files of every input, opened on first use (safe_open maps the file; reading one tensor
    reads only its bytes)."""

    def __init__(self, sources: list[Source]):
        super().__init__()
        self.sources = sources
        self.open: dict[str, object] = {}

    def handle(self, i: int, name: str):
        from safetensors import safe_open

        path = os.path.join(self.sources[i].hf_dir, self.sources[i].files[name])
        if path not in self.open:
            try:
                self.open[path] = self.enter_context(safe_open(path, "pt"))
            except Exception as e:  # a truncated or damaged file
                raise AverageError(f"{path} ({self.sources[i].given}): cannot open it: {e}") from None
        return self.open[path]


def read_tensor(handle, name: str):
    """One tensor from an open safetensors file (its own memory; the tests count how many are alive)."""
    return handle.get_tensor(name)


# ----------------------------------------------------------------------------------------- average


def normalise_weights(weights: list[float] | None, n: int) -> list[float]:
    """Uniform by default; else `n` positive weights, divided by their sum."""
    if weights is None:
        return [1.0 / n] * n
    if len(weights) != n:
        raise AverageError(f"--weights gives {len(weights)} weight(s) for {n} input(s): give one per input, in order")
    if any(not w > 0 or w == float("inf") for w in weights):
        raise AverageError(f"--weights {' '.join(map(str, weights))}: every weight must be a positive number "
                           "(leave an input out rather than weigh it 0)")
    total = sum(weights)
    return [w / total for w in weights]


def _averaged(sources: list[Source], weights: list[float], names: list[str], readers: _Readers, log):
    """(name, averaged tensor in the inputs' dtype) for each name; one tensor per input is read at a time."""
    import torch

    started, done, every = time.time(), 0, max(1, len(names) // 10)
    for name in names:
        acc, total = None, 0.0
        for i, (source, weight) in enumerate(zip(sources, weights)):
            x = read_tensor(readers.handle(i, name), name)
            if not x.is_floating_point():   # integer buffers: the same in every input, copied
                if acc is None:
                    acc = x
                elif not torch.equal(acc, x):
                    raise AverageError(f"{os.path.join(source.hf_dir, source.files[name])} ({source.given}): "
                                       f"integer tensor {name} differs from the first input's; it cannot be averaged")
                del x
                continue
            dtype = x.dtype   # accumulated in fp32 (fp64 inputs in fp64)
            x32 = x.to(torch.float64 if dtype == torch.float64 else torch.float32, copy=True)
            del x
            total += weight
            if acc is None:
                acc = x32
            else:   # running mean: exact for identical inputs (x32 - acc == 0)
                acc.add_(x32.sub_(acc), alpha=weight / total)
            del x32
        out = acc if not acc.is_floating_point() else acc.to(dtype)
        del acc
        done += 1
        if done % every == 0 or done == len(names):
            log(f"averaged {done}/{len(names)} tensors ({time.time() - started:.0f} s)")
        yield name, out


def _weight_files(source: Source) -> dict:
    files = sorted(set(source.files.values()))
    out = {"weight_files": {f: os.path.getsize(os.path.join(source.hf_dir, f)) for f in files}}
    index = os.path.join(source.hf_dir, INDEX if os.path.isfile(os.path.join(source.hf_dir, INDEX)) else SINGLE)
    if index.endswith(".json"):
        with open(index, "rb") as f:
            out["index_sha256"] = hashlib.sha256(f.read()).hexdigest()
    else:  # the safetensors header: every tensor's name, dtype, shape and offsets
        with open(index, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            out["header_sha256"] = hashlib.sha256(f.read(size)).hexdigest()
    return out


def average(sources: list[Source], out_dir: str, weights: list[float] | None = None,
            shard_bytes: int = DEFAULT_SHARD_MB * 2**20, log=print) -> str:
    """Write the weighted average of `sources` (see `resolve_inputs`) to `out_dir` (new, or empty); returns it.
    Everything is checked before anything is written; the folder appears only once complete."""
    if not sources:
        raise AverageError("nothing to average: name at least one input")
    weights = normalise_weights(weights, len(sources))
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise FileExistsError(f"{out_dir} exists and is not empty")
    names = check_compatible(sources)
    out_dir = os.path.abspath(out_dir)
    partial = os.path.join(os.path.dirname(out_dir), f".{os.path.basename(out_dir)}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    with _Readers(sources) as readers:
        save_hf_model(_averaged(sources, weights, names, readers, log), sources[0].hf_dir, partial,
                      shard_bytes=shard_bytes)
    with open(os.path.join(partial, "config.json")) as f:
        dtype = json.load(f).get("dtype")
    metadata = {
        "created_by": "ovr-hpc average",
        "method": "weighted mean of every tensor, accumulated in float32, cast back to the inputs' dtype",
        "dtype": dtype,
        "tensors": len(names),
        "tie_word_embeddings": _tied(sources[0].config),
        "config_and_processor_from": sources[0].hf_dir,
        "inputs": [{"given": s.given, "path": os.path.abspath(s.hf_dir), "checkpoint": s.checkpoint, "step": s.step,
                    "weight": w, **_weight_files(s)} for s, w in zip(sources, weights)],
    }
    with open(os.path.join(partial, METADATA), "w") as f:
        json.dump(metadata, f, indent=1)
    if os.path.isdir(out_dir):
        os.rmdir(out_dir)   # empty (checked above)
    os.replace(partial, out_dir)
    return out_dir


def average_command(args) -> int:
    """`ovr-hpc average CKPT_OR_RUN... --out DIR [--weights W ...] [--steps A:B:S] [--shard-mb MB]`."""
    try:
        weights = None
        if args.weights:
            try:
                weights = [float(w) for part in args.weights for w in part.split(",") if w]
            except ValueError:
                raise AverageError(f"--weights {' '.join(args.weights)}: expected numbers") from None
        if os.path.exists(args.out) and (not os.path.isdir(args.out) or os.listdir(args.out)):
            raise FileExistsError(f"{args.out} exists and is not empty")
        sources = resolve_inputs(args.inputs, args.steps)
        weights = normalise_weights(weights, len(sources))
        for s, w in zip(sources, weights):
            print(f"input {s.given}: {s.hf_dir} (weight {w:.6g})", flush=True)
        out = average(sources, args.out, weights, shard_bytes=args.shard_mb * 2**20,
                      log=lambda m: print(m, file=sys.stderr, flush=True))
    except (AverageError, FileNotFoundError, FileExistsError) as e:
        print(f"ovr-hpc average: {e}", file=sys.stderr)
        return 2
    print(f"wrote the average of {len(sources)} input(s) to {out} (inputs in {os.path.join(out, METADATA)})")
    return 0
