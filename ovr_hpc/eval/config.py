"""The `eval` stage's typed config (registered as stage "eval"; no torch import, like ovr_hpc/config.py).

    model.path          a Hugging Face model directory, or a training run (OUTPUT_DIR, .../checkpoints,
                        .../latest, .../step_N): its newest complete checkpoint's hf/ weights
    benchmarks          [{name, path, images, label, limit, options}], each read by the adapter `name`
                        (ovr_hpc/eval/benchmarks.py) from its published local layout
    sampling            greedy (temperature 0, n 1) or n samples at temperature T (avg@n, pass@k)
    output_dir          OUTPUT_DIR/<label>/samples.rank*.jsonl (appended as produced: a restarted eval
                        skips what is done), samples.jsonl + metrics.json per benchmark,
                        summary.md / summary.json beside the paper's numbers
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Literal, Optional

from ovr_hpc.config import ConfigError, RolloutEngineConfig, _positive, register_stage
from ovr_hpc.data.prompts import DEFAULT_CHOICE_INSTRUCTION, DEFAULT_INSTRUCTION


@dataclass
class EvalModelConfig:
    path: str = ""
    """A Hugging Face model directory, or a training run / checkpoint (its hf/ weights are evaluated)."""
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    """Inference dtype (float32 on CPUs: bf16 matmuls are slow there)."""
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = "auto"
    """auto = flash_attention_2 on GPUs where flash-attn imports, else sdpa."""

    def validate(self, prefix: str) -> None:
        if not self.path:
            raise ConfigError(f"{prefix}.path is required: a model directory or a training run's output_dir")


@dataclass
class BenchmarkSpec:
    name: str = ""
    """Adapter: mathvista, mathvision, mathverse, dynamath, wemath, logicvista, mmmu_pro,
    charxiv_reasoning, charxiv_descriptive, math500, aime24, aime25, gpqa_diamond, mmlu, mmlu_pro,
    mmbench_en, mme, records."""
    path: str = ""
    """Data file, glob or folder (relative paths resolve against data_root); empty = the adapter's default."""
    images: str = ""
    """Image folder for relative image paths; empty = the adapter's default beside the data file."""
    label: str = ""
    """Name of the results folder and table row (default: name); lets one adapter run twice."""
    limit: Optional[int] = None
    """Evaluate only the first N samples (smoke tests)."""
    options: dict = field(default_factory=dict)
    """Adapter-specific options (e.g. charxiv_descriptive: {templates: qid -> question JSON})."""

    @property
    def key(self) -> str:
        return self.label or self.name


@dataclass
class SamplingConfig:
    n: int = 1
    """Samples per prompt (avg@n and pass@n are reported)."""
    temperature: float = 0.0
    """0 = greedy (then n must be 1)."""
    top_p: float = 1.0
    """Nucleus sampling mass."""
    max_new_tokens: int = 32768
    """Response budget; a response cut here scores 0 when scoring.require_finished."""
    seed: int = 0
    """Base sampling seed (each generate call derives its own from it)."""
    pass_k: list[int] = field(default_factory=list)
    """Extra k values for pass@k (each <= n); pass@n is always reported."""

    def validate(self, prefix: str) -> None:
        _positive(prefix, "n", self.n)
        _positive(prefix, "max_new_tokens", self.max_new_tokens)
        if self.temperature < 0:
            raise ConfigError(f"{prefix}.temperature ({self.temperature}) must be >= 0 (0 = greedy)")
        if self.temperature == 0 and self.n > 1:
            raise ConfigError(
                f"{prefix}.n ({self.n}) > 1 needs {prefix}.temperature > 0: greedy samples are all the same; "
                f"set {prefix}.temperature=1.0 or {prefix}.n=1"
            )
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"{prefix}.top_p ({self.top_p}) must be in (0, 1]")
        for i, k in enumerate(self.pass_k):
            if not 1 <= k <= self.n:
                raise ConfigError(f"{prefix}.pass_k[{i}] = {k}: must be between 1 and {prefix}.n ({self.n})")


@dataclass
class PromptConfig:
    template: Literal["chat", "orz"] = "chat"
    """As the RL stage's data.prompt_template: chat = the model's chat template, user turn = question
    (+ lettered options) + newline + instruction; orz = ORZ's plain-text template (no instruction)."""
    system: Optional[str] = None
    """System message of the chat template; None keeps the template's default."""
    instruction: str = DEFAULT_INSTRUCTION
    """After every free-form question (default: the RL stage's data.instruction; empty = the question alone)."""
    choice_instruction: str = DEFAULT_CHOICE_INSTRUCTION
    """After multiple-choice questions and their lettered options."""

    def validate(self, prefix: str) -> None:
        pass


# rollout.options (a dict once passed as is to VLLMRolloutEngine) -> the typed rollout key that replaced each
# of its entries; None: no config key (the builder sets it).
_OPTIONS_MOVED = {
    **{name: name for name in ("tensor_parallel_size", "gpu_memory_utilization", "max_model_len",
                               "max_num_batched_tokens", "max_num_seqs", "enable_sleep_mode", "sleep_level",
                               "enforce_eager", "max_images_per_prompt", "seed_per_request")},
    "kv_cache_memory_bytes": "kv_cache_mb", "weight_bucket_bytes": "weight_bucket_mb", "allow_cpu": "vllm_allow_cpu",
}


@dataclass
class EvalRolloutConfig(RolloutEngineConfig):
    """The engine's keys (RolloutEngineConfig, as in the RL stage; three defaults differ: an eval generates
    alone on its GPUs) and the image bounds."""

    batch_size: int = 16
    """Prompts per generate call (either engine); results are appended to the JSONL after each call."""
    max_num_batched_tokens: int = 8192
    enable_sleep_mode: bool = False
    """vllm: off, as nothing else needs the GPU between generations (CUDA only; ignored with vllm_allow_cpu)."""
    min_pixels: int = 3136
    """Images are resized (qwen-vl-utils smart_resize) to at least this many pixels..."""
    max_pixels: int = 1003520
    """...and at most this many (1003520 = 1280 visual tokens)."""

    @staticmethod
    def removed_key(key: str, value, full: str) -> Optional[str]:
        """The error for a key this section no longer has (asked by the loader before "unknown key")."""
        if key != "options":
            return None
        section, fixes = full.rsplit(".", 1)[0], []
        for name, v in value.items() if isinstance(value, dict) else ():
            new = _OPTIONS_MOVED.get(name)
            if new is None:
                fixes.append(f"{name} (no config key)")
            else:   # the two byte counts became MiB
                mib = name.endswith("_bytes") and isinstance(v, int)
                fixes.append(f"{section}.{new}: {json.dumps(v >> 20 if mib else v)}")
        return (f"{full} is gone: the vLLM engine's settings are typed keys of {section} now"
                + (f"; write {', '.join(fixes)}" if fixes else ""))

    def validate(self, prefix: str) -> None:
        super().validate(prefix)
        _positive(prefix, "min_pixels", self.min_pixels)
        if self.max_pixels < self.min_pixels:
            raise ConfigError(f"{prefix}.max_pixels ({self.max_pixels}) must be >= min_pixels ({self.min_pixels})")


@dataclass
class ScoringConfig:
    num_workers: int = 4
    """Reward worker processes per rank (ovr_hpc.grading.RewardPool); 0 scores in-process."""
    timeout_s: float = 10.0
    """A response whose check takes longer scores 0 (reason "timeout")."""
    require_finished: bool = True
    """A response cut at max_new_tokens scores 0, as in the RL reward."""

    def validate(self, prefix: str) -> None:
        if self.num_workers < 0:
            raise ConfigError(f"{prefix}.num_workers ({self.num_workers}) must be >= 0")
        if self.timeout_s <= 0:
            raise ConfigError(f"{prefix}.timeout_s ({self.timeout_s}) must be > 0")


@dataclass
class EvalConfig:
    """Evaluation of a model or checkpoint on a list of benchmarks; resumable, data-parallel over ranks."""

    model: EvalModelConfig = field(default_factory=EvalModelConfig)
    benchmarks: list[BenchmarkSpec] = field(default_factory=list)
    """The benchmarks, in order: each {name, path, images, label, limit, options}."""
    data_root: str = ""
    """Folder the benchmarks' relative paths (and adapter defaults) resolve against."""
    output_dir: str = ""
    """Results: per-sample JSONL per benchmark, metrics, summary.md / summary.json."""
    max_bad_fraction: float = 0.0
    """Fail before generating if a benchmark has more bad records than this share (each is reported)."""
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    rollout: EvalRolloutConfig = field(default_factory=EvalRolloutConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)

    def validate(self) -> None:
        from ovr_hpc.eval.benchmarks import BENCHMARKS

        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            if dataclasses.is_dataclass(section):
                section.validate(f.name)
        if not self.output_dir:
            raise ConfigError("output_dir is required")
        if not self.benchmarks:
            raise ConfigError(
                "benchmarks is empty: give at least one, e.g. benchmarks=[{name: math500, path: MATH-500/test.jsonl}]"
            )
        seen: dict[str, int] = {}
        for i, spec in enumerate(self.benchmarks):
            if spec.name not in BENCHMARKS:
                raise ConfigError(
                    f"benchmarks[{i}].name = {spec.name!r}: expected one of {', '.join(sorted(BENCHMARKS))}"
                )
            if spec.limit is not None:
                _positive(f"benchmarks[{i}]", "limit", spec.limit)
            if spec.key in seen:
                raise ConfigError(
                    f"benchmarks[{i}] and benchmarks[{seen[spec.key]}] are both labelled {spec.key!r}: "
                    f"give one of them a different benchmarks[{i}].label"
                )
            if "/" in spec.key or spec.key.startswith("."):
                raise ConfigError(f"benchmarks[{i}].label = {spec.key!r}: must be a plain folder name")
            seen[spec.key] = i
            BENCHMARKS[spec.name].validate_options(spec.options, f"benchmarks[{i}].options")
            if not spec.path and not BENCHMARKS[spec.name].default_path:
                raise ConfigError(f"benchmarks[{i}].path is required for {spec.name!r} (it has no default layout)")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ConfigError(f"max_bad_fraction ({self.max_bad_fraction}) must be in [0, 1]")

    def validate_world(self, world_size: int) -> None:
        """Checks that need the number of ranks (`ovr-hpc check eval CONFIG --world-size N`, the sbatch script)."""
        tp = self.rollout.tensor_parallel_size if self.rollout.engine == "vllm" else 1
        if world_size % tp:
            raise ConfigError(
                f"rollout.tensor_parallel_size ({tp}) must divide the number of ranks ({world_size}): "
                "each vLLM engine spans that many ranks"
            )


register_stage("eval", EvalConfig)
