"""THE RL LOOP: PPO with GAE and a separate critic, verifiable rewards, readable top to bottom.

build (ranks, prompts, policy, critic, rollout engine, reward workers) -> resume -> per step:
prompts -> rollouts -> rewards -> old log-probs and values -> advantages -> policy update ->
critic updates -> weights to the rollout engine -> metrics -> checkpoint / stop on request.

Each rank generates for its share of the step's prompts (all `samples_per_prompt` of a prompt on the
same rank, so group statistics stay local), and trains on what it generated. Sums that must be global
(advantage moments, token counts, metrics) go through the engine's `dp_sum`; micro-batches are cut by a
token budget and every rank runs the same number of them (ZeRO-3 gathers parameters collectively).
Each section of the step is a function below the loop, over one `RolloutBatch`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import json
import math
import os
import time
from collections import defaultdict
from dataclasses import dataclass

import torch

from ovr_hpc import dist, stage as stages
from ovr_hpc.buckets import token_budget_batches
from ovr_hpc.checkpoint import preempted
from ovr_hpc.config import RLConfig, to_dict
from ovr_hpc.data.dataset import IGNORE_INDEX, Collator
from ovr_hpc.data.templates import TokenizedSample
from ovr_hpc.data.weights import source_counts, weighted_rows_at
from ovr_hpc.engines.base import build_engine
from ovr_hpc.grading import RewardPool
from ovr_hpc.metrics import MetricsLogger
from ovr_hpc.models.loading import TokenLogprobs, load_processor, load_vlm
from ovr_hpc.rl import advantages as adv_fns
from ovr_hpc.rl import losses
from ovr_hpc.rl import partial as carry
from ovr_hpc.rl.prompts import load_rl_prompts, stop_strings, to_rollout_prompt
from ovr_hpc.rollout.base import Completion, RolloutInterrupted, SampleRequest, SamplingParams
from ovr_hpc.rollout.build import build_rollout_engine


# ----------------------------------------------------------------------------- the loop


def train(cfg: RLConfig) -> dict:
    # ---- where we are: ranks, every pre-run check, the stop flag, seeds (ovr_hpc/stage.py)
    stage = stages.start(cfg, cfg.checkpoint.output_dir)
    info, log, out_dir = stage.info, stage.log, stage.out_dir
    alg, ro = cfg.algorithm, cfg.rollout

    # ---- prompts (checked once, split over the ranks, cached), same list on every rank
    processor = load_processor(cfg.model.path, cfg.data.min_pixels, cfg.data.max_pixels)
    prompts, report = load_rl_prompts(cfg.data, processor, cfg.model.path,
                                      cfg.data.cache_dir or os.path.join(out_dir, "data_cache"), info.rank,
                                      info.world_size)
    log(report.format())
    report.check_threshold(cfg.data.max_bad_fraction)
    if not prompts:
        raise ValueError(f"no usable prompts in {cfg.data.train_files}")
    total_steps = cfg.schedule.max_steps or math.ceil(cfg.schedule.epochs * len(prompts) / ro.prompts_per_step)

    # ---- policy, critic, reference, rollout engine, reward workers
    policy = build_engine("policy", cfg.model, cfg.parallel, cfg.optimizer, cfg.schedule, total_steps, info.world_size)
    engines = {"policy": policy}
    critic = None
    if alg.advantage == "gae":
        critic = engines["critic"] = build_engine("critic", cfg.model, cfg.parallel, cfg.critic.optimizer,
                                                  cfg.schedule, total_steps, info.world_size,
                                                  model_path=cfg.critic.path, seed=cfg.seed)
    reference = build_reference(cfg) if alg.kl_coef > 0 else None
    rollout = rollout_engine(cfg, processor)
    reward_pool = RewardPool(alg.reward_workers, alg.reward_timeout_s)
    collator = Collator(processor, cfg.data.min_pixels, cfg.data.max_pixels,
                        always_run_vision=any(p.images for p in prompts))

    # ---- resume; the rollout engine then serves the resumed weights, never the initial ones (vLLM starts
    #      with dummy weights)
    state = stage.resume(engines)
    step, tokens_seen = state.get("step", 0), state.get("tokens_seen", 0)
    rollout.load_weights(policy.iter_full_params())
    carried = resumed_carried(stage, ro.partial)   # partial rollouts: the unfinished groups (None: off)
    metrics = MetricsLogger(out_dir, info.is_main, cfg.logging, total_steps, resume_step=step,
                            run_config=to_dict(cfg))

    def save() -> None:
        stage.save(engines, {"step": step, "tokens_seen": tokens_seen, "prompts_consumed": step * ro.prompts_per_step,
                             "max_response_len": ro.response_len_at(step)},
                   rank_json=None if carried is None else {"partial_rollouts": carry.to_json(*carried)})

    status: str | None = None  # stays None when a resumed run had already finished
    while step < total_steps:
        times, t_step = {}, time.perf_counter()
        # ---- 1. this rank's prompts of the step; generate (a stop signal drops the step: it is drawn again
        #         from the same seeds after the resume, and the checkpoint is the state it started from)
        mine = step_prompts(prompts, step, cfg, policy)
        params = sampling_params(cfg, step, policy.dp_rank)
        with timed(times, "generate"):
            if carried is None:
                rolled = generate(rollout, mine, cfg, params, stage.stop, policy)
            else:   # partial rollouts: continued and new sequences up to the step's budget
                rolled = generate_partial(rollout, prompts, carried, step, cfg, params, stage.stop, policy)
        if rolled.completions is None:
            status = stop_during_rollouts(stage, step, save)
            break
        mine, carried = rolled.prompts, rolled.carried
        # ---- 2. rewards, in worker processes
        with timed(times, "reward"):
            batch = score(mine, rolled.completions, reward_pool, rolled.versions)
        if info.is_main:  # a few responses per step, the first thing to read when rewards look wrong
            log_samples(out_dir, step + 1, mine, batch)
        # ---- 3. old log-probs and values, on packed micro-batches (the same count on every rank)
        with timed(times, "logprobs"):
            packed = Packed(batch, range(len(batch.samples)), alg.max_tokens_per_microbatch, collator)
            old_logprobs_and_values(packed, policy, critic, reference, ro.temperature, ro.partial, step)
        # ---- 4. advantages: GAE whitened over the global batch, or GRPO's group-normalised rewards
        num_tokens = compute_advantages(batch, alg, ro.samples_per_prompt, policy)
        # ---- 5. policy update(s): token-level PPO over the global batch
        with timed(times, "policy_update"):
            policy_stats = update_policy(policy, packed, alg, num_tokens / policy.loss_scale_for_mean(),
                                         ro.temperature, reference is not None)
        # ---- 6. critic updates: one pass in shuffled mini-batches (ORZ's critic_update_steps)
        with timed(times, "critic_update"):
            critic_stats = update_critic(critic, batch, collator, alg, seed=step_seed(cfg, step, policy.dp_rank))
        # ---- 7. the new policy's weights to the rollout engine
        with timed(times, "sync"):
            rollout.load_weights(policy.iter_full_params())
        # ---- 8. metrics (global sums; per-source accuracy)
        step += 1
        values = step_metrics(batch, policy_stats, critic_stats, policy, critic is not None)
        tokens_seen += int(values.pop("_tokens"))
        values.update(step_timing(times, t_step, batch, policy), lr=policy.lr(), grad_norm=policy.grad_norm(),
                      max_response_len=params.max_new_tokens, **rolled.stats, **report.as_metrics())
        values.update(source_counts(step_prompt_ids(prompts, step - 1, cfg), [p.source for p in prompts], "prompts"))
        if critic is not None:
            values.update({"critic/lr": critic.lr(), "critic/grad_norm": critic.grad_norm()})
        metrics.log(step, values)
        # ---- 9. checkpoint / stop
        status = stage.end_of_step(step, total_steps, save)
        if status:
            break
    result = stage.finish(status, step, total_steps, save)
    reward_pool.close()
    rollout.close()
    metrics.close()
    return result


# ----------------------------------------------------------------------------- one step's batch


@dataclass
class RolloutSample:
    """One response of the step on this rank, and what the trainer computes for it (per response token)."""

    tokens: TokenizedSample          # prompt + response ids, the loss span on the response, the images
    prompt: int                      # index among this rank's prompts of the step
    text: str                        # the response as graded
    finish_reason: str               # "stop" (end of turn or a stop string) or "length" (truncated)
    source: str
    response_len: int
    rollout_logprobs: torch.Tensor   # as the rollout engine sampled them (vLLM's may differ in length)
    reward: float = 0.0
    reason: str = ""
    old_logprobs: torch.Tensor | None = None
    ref_logprobs: torch.Tensor | None = None
    values: torch.Tensor | None = None
    advantages: torch.Tensor | None = None
    returns: torch.Tensor | None = None
    versions: torch.Tensor | None = None     # partial rollouts: the step whose weights sampled each token
    is_weights: torch.Tensor | None = None   # partial rollouts: the truncated importance weight per token

    @property
    def finished(self) -> bool:
        return self.finish_reason == "stop"


@dataclass
class RolloutBatch:
    samples: list[RolloutSample]

    def column(self, name: str) -> list:
        return [getattr(s, name) for s in self.samples]


class Packed:
    """Some samples of a batch as micro-batches of packed rows: consecutive samples up to a token budget,
    padded with empty micro-batches to the same count on every rank. Moves per-sample response vectors to
    and from the rows' loss positions."""

    def __init__(self, batch: RolloutBatch, indices, budget: int, collator: Collator):
        indices = list(indices)
        lengths = [len(batch.samples[i].tokens.input_ids) for i in indices]
        self.batch = batch
        self.groups = [[indices[k] for k in g] for g in token_budget_batches(lengths, budget)]
        count = max(1, int(dist.all_reduce_max(len(self.groups))))
        self.groups += [[] for _ in range(count - len(self.groups))]  # no-loss dummy forwards
        self.micro = [make_micro_batch(collator, batch, g) for g in self.groups]

    def mask(self, j: int) -> torch.Tensor:
        return (self.micro[j].targets != IGNORE_INDEX).float()

    def on_positions(self, j: int, name: str) -> torch.Tensor:
        """Field `name` of micro-batch j's samples at its loss positions."""
        return scatter_to_positions([getattr(self.batch.samples[i], name) for i in self.groups[j]],
                                    self.micro[j].targets)

    def store(self, j: int, name: str, per_position: torch.Tensor) -> None:
        """The inverse: a [T] tensor over micro-batch j's positions into field `name` of its samples."""
        group = self.groups[j]
        lengths = [self.batch.samples[i].response_len for i in group]
        for i, v in zip(group, gather_from_positions(per_position, self.micro[j].targets, lengths)):
            setattr(self.batch.samples[i], name, v)


# ----------------------------------------------------------------------------- the sections of a step


def step_seed(cfg: RLConfig, step: int, dp_rank: int) -> int:
    """Sampling and mini-batch shuffling of a step on a rank: a resumed run draws the same ones."""
    return cfg.seed * 1_000_003 + step * 1009 + dp_rank


def step_prompt_ids(prompts: list, step: int, cfg: RLConfig) -> list[int]:
    """The step's prompts over all ranks: an endless seeded stream, weighted by data.source_weights."""
    ro = cfg.rollout
    return weighted_rows_at(step * ro.prompts_per_step, ro.prompts_per_step, [p.source for p in prompts],
                            cfg.data.source_weights, cfg.seed, cfg.data.shuffle)


def step_prompts(prompts: list, step: int, cfg: RLConfig, policy) -> list:
    """This data-parallel rank's share of the step's prompts (step_prompt_ids)."""
    ro = cfg.rollout
    ids = step_prompt_ids(prompts, step, cfg)
    per_rank = ro.prompts_per_step // policy.dp_size
    return [prompts[i] for i in ids[policy.dp_rank * per_rank : (policy.dp_rank + 1) * per_rank]]


def sampling_params(cfg: RLConfig, step: int, dp_rank: int) -> SamplingParams:
    ro = cfg.rollout
    return SamplingParams(n=ro.samples_per_prompt, temperature=ro.temperature, top_p=ro.top_p,
                          max_new_tokens=ro.response_len_at(step), stop=stop_strings(cfg.data, ro),
                          seed=step_seed(cfg, step, dp_rank))


@dataclass
class Rollouts:
    """What a step's generation gave this rank."""

    prompts: list                   # the prompts generated for (partial rollouts: of the groups that finished)
    completions: list | None        # n completions per prompt; None: a stop signal interrupted the rollouts
    stats: dict                     # generation metrics (balance over the ranks, tail, partial/*)
    carried: tuple | None = None    # partial rollouts: the buffer after the step (unfinished groups, mean length)
    versions: list | None = None    # partial rollouts: per prompt, per completion, the version of every token


def generate(rollout, prompts: list, cfg: RLConfig, params: SamplingParams, stop, policy) -> Rollouts:
    """n completions per prompt, generated whole. The engine sleeps afterwards (vLLM: its weights and KV
    cache make room for the updates, or a save)."""
    t0 = time.perf_counter()
    try:
        completions = rollout.generate([to_rollout_prompt(p, cfg.data) for p in prompts], params,
                                       should_stop=stop.agreed)
    except RolloutInterrupted:
        completions = None
    rollout.sleep()
    if completions is None:
        return Rollouts(prompts, None, {})
    done = [c for outs in completions for c in outs]
    return Rollouts(prompts, completions, generation_stats(policy, time.perf_counter() - t0,
                                                           [c.finish_s for c in done],
                                                           sum(len(c.token_ids) for c in done)))


def generate_partial(rollout, prompts: list, carried: tuple, step: int, cfg: RLConfig, params: SamplingParams,
                     stop, policy) -> Rollouts:
    """A step of partial rollouts (ovr_hpc/rl/partial.py): drop the stale groups, give the step's new
    prompts to the ranks by expected tokens, then rounds of at most rollout.partial.tokens_per_step tokens
    per unfinished sequence until every rank has a finished group. The finished groups are the step's
    batch; the buffer passed in is left as it was (a stop during the rollouts saves it)."""
    ro, pc = cfg.rollout, cfg.rollout.partial
    groups, mean_len = copy.deepcopy(carried)
    max_len = ro.response_len_at(step)
    mean_len = mean_len or max_len / 2   # the length model's mean, until groups have finished
    groups, dropped = carry.split_stale(groups, step, pc.max_staleness)
    loads = [0.0] * policy.dp_size
    loads[policy.dp_rank] = sum(carry.expected_step_tokens(carry.step_limit(s, pc.tokens_per_step, max_len), mean_len)
                                for g in groups for s in g.samples if not s.finished)
    cost = ro.samples_per_prompt * carry.expected_step_tokens(min(pc.tokens_per_step, max_len), mean_len)
    ids = step_prompt_ids(prompts, step, cfg)
    owners = carry.assign_new_groups(policy.dp_sum(loads), len(ids), cost)
    groups += [carry.new_group(i, step, ro.samples_per_prompt) for i, r in zip(ids, owners) if r == policy.dp_rank]
    # the hf engine asks should_stop per batch: equal counts on every rank only with one rank (vLLM's ranks
    # step in lockstep); otherwise the stop is agreed between rounds
    in_engine = stop.agreed if policy.dp_size == 1 or cfg.rollout.engine == "vllm" else None
    t0, finish, tokens, rounds = time.perf_counter(), [], 0, 0
    try:
        while True:
            todo = carry.to_continue(groups)
            requests = [SampleRequest(to_rollout_prompt(prompts[groups[g].prompt_id], cfg.data),
                                      groups[g].samples[k].token_ids,
                                      carry.step_limit(groups[g].samples[k], pc.tokens_per_step, max_len))
                        for g, k in todo]
            offset = time.perf_counter() - t0
            outs = rollout.generate_samples(requests, dataclasses.replace(params, seed=params.seed + 104729 * rounds),
                                            should_stop=in_engine)
            for (g, k), c in zip(todo, outs):
                carry.absorb(groups[g].samples[k], c.token_ids, c.logprobs, c.finish_reason, c.text, step, max_len)
                groups[g].prompt_ids = c.prompt_ids
                finish.append(offset + c.finish_s)
                tokens += len(c.token_ids)
            rounds += 1
            (missing,) = policy.dp_sum([float(not any(g.finished for g in groups))])
            if not missing:
                break
            if in_engine is None and stop.agreed():
                raise RolloutInterrupted(f"stopped after {rounds} rounds")
    except RolloutInterrupted:
        rollout.sleep()
        return Rollouts([], None, {})
    rollout.sleep()
    seconds = time.perf_counter() - t0
    trained, groups = carry.take_finished(groups)
    lengths = [len(s.token_ids) for g in trained for s in g.samples]
    length_sum, length_n = policy.dp_sum([float(sum(lengths)), float(len(lengths))])
    hist = carry.staleness_counts(trained, step)
    sums = policy.dp_sum([float(len(dropped)), float(len(groups)), float(rounds)]
                         + [float(hist.get(k, 0)) for k in range(pc.max_staleness + 1)])
    stats = generation_stats(policy, seconds, finish, tokens)
    stats.update({"partial/dropped_groups": sums[0], "partial/carried_groups": sums[1],
                  "partial/rounds": sums[2] / policy.dp_size,
                  "partial/old_policy_token_share": sum(sums[4:]) / max(1.0, sum(sums[3:])),
                  **{f"partial/staleness_tokens/{k}": v for k, v in enumerate(sums[3:])}})
    completions = [[Completion(k, g.prompt_ids, s.token_ids, s.text, s.finish_reason, s.logprobs) for s in g.samples]
                   for k, g in enumerate(trained)]
    next_mean = length_sum / length_n if length_n else mean_len
    return Rollouts([prompts[g.prompt_id] for g in trained], completions, stats, (groups, next_mean),
                    [[s.versions for s in g.samples] for g in trained])


def generation_stats(policy, seconds: float, finish_times: list[float], tokens: int) -> dict:
    """Generation balance and tail over the ranks: time and tokens per rank (max, mean), the tail (seconds
    from 90% of a rank's samples done to its last, max over ranks) and the idle fraction (1 - mean finish
    time / last finish time: the share of sequence slots waiting for the last sample, mean over ranks)."""
    last = max(finish_times, default=0.0)
    idle = 1.0 - sum(finish_times) / len(finish_times) / last if last > 0 else 0.0
    time_sum, tokens_sum, idle_sum = policy.dp_sum([seconds, float(tokens), idle])
    n = policy.dp_size
    return {"gen/time_per_rank_max": dist.all_reduce_max(seconds), "gen/time_per_rank_mean": time_sum / n,
            "gen/tokens_per_rank_max_over_mean": dist.all_reduce_max(float(tokens)) / max(1.0, tokens_sum / n),
            "gen/tail_s": dist.all_reduce_max(carry.tail_seconds(finish_times)), "gen/idle_fraction": idle_sum / n}


def resumed_carried(stage, partial_cfg) -> tuple | None:
    """Partial rollouts: the carried buffer of the checkpoint resumed from (empty for a fresh run); None
    when they are off."""
    if not partial_cfg.enabled:
        return None
    data = stage.resumed_rank_json("partial_rollouts")
    if data is None and stage.checks.resume_from:
        print(f"rank {stage.info.rank}: {stage.checks.resume_from} holds no partial-rollout buffer for this rank: "
              "starting with none carried", flush=True)
    return carry.from_json(data) if data is not None else ([], None)


def stop_during_rollouts(stage, step: int, save) -> str:
    """A stop while generating step + 1: that step never happened; step `step` is saved (if not already)."""
    moment = f" during the rollouts of step {step + 1}"
    if stage.saved(step):
        return preempted(stage.stop, stage.log, f"{moment}: step {step} is saved already")
    return preempted(stage.stop, stage.log, f"{moment}: saving step {step}", save)


def score(prompts: list, completions: list, reward_pool: RewardPool, versions: list | None = None) -> RolloutBatch:
    """Completions -> the step's samples with their rewards (graded in the pool's worker processes);
    versions (partial rollouts): per prompt, per completion, the version of every token."""
    samples, items = [], []
    for k, (p, outs) in enumerate(zip(prompts, completions)):
        for c in outs:
            ids = c.prompt_ids + c.token_ids
            tokens = TokenizedSample(ids, [(len(c.prompt_ids), len(ids))], p.images, p.image_sizes, p.where)
            samples.append(RolloutSample(tokens, k, c.text, c.finish_reason, p.source, len(c.token_ids),
                                         torch.tensor(c.logprobs, dtype=torch.float32)))
            items.append((c.text, p.answer, p.answer_type, c.finish_reason == "stop"))
    for s, r in zip(samples, reward_pool.score_batch(items)):
        s.reward, s.reason = r.score, r.reason
    for s, v in zip(samples, [v for per_prompt in versions or [] for v in per_prompt]):
        s.versions = torch.tensor(v, dtype=torch.long)
    return RolloutBatch(samples)


@torch.no_grad()
def old_logprobs_and_values(packed: Packed, policy, critic, reference, temperature: float, partial_cfg=None,
                            step: int = 0) -> None:
    """The log-probs of the sampled tokens under the policy that sampled them (recomputed by the trainer),
    the critic's values, and the reference's log-probs (only with a KL penalty). Partial rollouts: the
    recomputed log-probs are the current policy's (the proximal one of decoupled PPO) and tokens sampled
    by older versions get a truncated importance weight against their sampling log-probs
    (ovr_hpc.rl.partial.importance_weights)."""
    logprobs = policy.forward(packed.micro, temperature=temperature)
    values = critic.forward(packed.micro) if critic is not None else [None] * len(packed.micro)
    for j, ((lp, _), v) in enumerate(zip(logprobs, values)):
        packed.store(j, "old_logprobs", lp)
        if v is not None:
            packed.store(j, "values", v)
        if reference is not None:
            rlp, _ = reference(**packed.micro[j].model_inputs(), temperature=temperature)
            packed.store(j, "ref_logprobs", rlp)
    if partial_cfg is not None and partial_cfg.enabled:
        for s in packed.batch.samples:
            s.is_weights = torch.tensor(carry.importance_weights(s.old_logprobs.tolist(), s.rollout_logprobs.tolist(),
                                                                 s.versions.tolist(), step, partial_cfg.is_cap))


def compute_advantages(batch: RolloutBatch, alg, group_size: int, policy) -> float:
    """Advantages and returns of every sample (step_advantages); returns the global response-token count."""
    advantages, returns, num_tokens = step_advantages(alg, batch.column("reward"), batch.column("values"),
                                                      batch.column("response_len"), group_size, policy.dp_sum)
    for s, a, r in zip(batch.samples, advantages, returns):
        s.advantages, s.returns = a, r
    return num_tokens


def ppo_loss(j: int, output, *, packed: Packed, alg, normalizer: float, kl: bool):
    """Micro-batch j's share of the global token-mean PPO loss (+ entropy bonus, + KL to the reference)."""
    lp, entropy = output
    mask = packed.mask(j)
    weighted = packed.batch.samples[0].is_weights is not None   # partial rollouts: importance weights
    pg_mask = mask * packed.on_positions(j, "is_weights") if weighted else mask
    loss, stats = losses.ppo_policy_loss(lp, packed.on_positions(j, "old_logprobs"),
                                         packed.on_positions(j, "advantages"), pg_mask, alg.clip_eps,
                                         alg.clip_eps_high, alg.dual_clip, normalizer=normalizer)
    if alg.entropy_coef:
        loss = loss - alg.entropy_coef * losses.masked_token_sum(entropy, mask, normalizer)
    if kl:
        penalty = losses.kl_penalty(lp, packed.on_positions(j, "ref_logprobs"), alg.kl_kind)
        loss = loss + alg.kl_coef * losses.masked_token_sum(penalty, mask, normalizer)
        stats["kl_ref_sum"] = (penalty.detach() * mask).sum().double()
    stats["entropy_sum"] = (entropy.detach() * mask).sum().double()
    return loss, stats


def update_policy(policy, packed: Packed, alg, normalizer: float, temperature: float, kl: bool) -> dict:
    """`policy_updates_per_step` optimizer steps, each over the whole batch; stats summed (ratio_max: max)."""
    stats_sum = defaultdict(float)
    loss_fn = functools.partial(ppo_loss, packed=packed, alg=alg, normalizer=normalizer, kl=kl)
    for _ in range(alg.policy_updates_per_step):
        for stats in policy.forward_backward(packed.micro, loss_fn, temperature=temperature, return_entropy=True):
            for k, v in stats.items():
                stats_sum[k] = max(stats_sum[k], v) if k == "ratio_max" else stats_sum[k] + v
        policy.step()
    return stats_sum


def value_loss(j: int, values, *, packed: Packed, alg, normalizer: float):
    return losses.value_loss(values, packed.on_positions(j, "values"), packed.on_positions(j, "returns"),
                             packed.mask(j), alg.value_clip, normalizer=normalizer)


def update_critic(critic, batch: RolloutBatch, collator: Collator, alg, seed: int) -> dict:
    """One pass over the step's samples, shuffled into `critic_updates_per_step` mini-batches, an optimizer
    step each; each mini-batch's loss is its own global token mean. Stats summed over the pass."""
    stats_sum = defaultdict(float)
    if critic is None:
        return stats_sum
    for indices in minibatch_split(len(batch.samples), alg.critic_updates_per_step, seed=seed):
        packed = Packed(batch, indices, alg.max_tokens_per_microbatch, collator)
        (tokens,) = critic.dp_sum([float(sum(batch.samples[i].response_len for i in indices))])
        loss_fn = functools.partial(value_loss, packed=packed, alg=alg,
                                    normalizer=tokens / critic.loss_scale_for_mean())
        for stats in critic.forward_backward(packed.micro, loss_fn):
            for k, v in stats.items():
                stats_sum[k] += v
        critic.step()
    return stats_sum


@contextlib.contextmanager
def timed(times: dict, name: str):
    t = time.perf_counter()
    yield
    times[name] = time.perf_counter() - t


def step_timing(times: dict, t_step: float, batch: RolloutBatch, policy) -> dict:
    seconds = time.perf_counter() - t_step
    (tokens,) = policy.dp_sum([float(sum(len(s.tokens.input_ids) for s in batch.samples))])
    return {**{f"time/{k}": v for k, v in times.items()}, "time/step": seconds, "tokens_per_second": tokens / seconds}


# ----------------------------------------------------------------------------- building blocks


def build_reference(cfg: RLConfig):
    """A frozen copy of the initial policy, outside the engine (only with a KL penalty)."""
    reference = TokenLogprobs(load_vlm(cfg.model.path, cfg.model.dtype, cfg.model.attn_implementation))
    return reference.to(dist.device()).eval().requires_grad_(False)


def rollout_engine(cfg: RLConfig, processor):
    """The rollout engine of the policy (vLLM: dummy weights until the first push); rollout.max_model_len 0
    = the longest prompt + the longest response of the length curriculum."""
    longest_response = max(length for _, length in cfg.rollout.max_response_len)
    return build_rollout_engine(cfg.rollout, cfg.model.path, dtype=cfg.model.dtype,
                                attn_implementation=cfg.model.attn_implementation, min_pixels=cfg.data.min_pixels,
                                max_pixels=cfg.data.max_pixels, seed=cfg.seed,
                                max_model_len=cfg.data.max_prompt_len + longest_response, processor=processor)


def minibatch_split(n: int, parts: int, seed: int) -> list[list[int]]:
    """range(n) shuffled (from `seed`) into `parts` mini-batches as equal as can be, each in index order;
    more parts than items leaves some empty (every rank still steps the same number of times)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return [sorted(chunk.tolist()) for chunk in torch.tensor_split(order, parts)]


def step_advantages(alg, rewards: list[float], values: list[torch.Tensor], response_len: list[int],
                    group_size: int, world_sum) -> tuple[list[torch.Tensor], list[torch.Tensor], float]:
    """Per-sample advantages and returns of one step, and the global number of response tokens.

    gae: the reward on the last token, GAE (gamma = lambda = 1: A_t = R - V_t, return R), then whitened
    over every response token of the global batch (ORZ's batch-level normalisation). grpo: each group's
    rewards normalised by its own mean and std, broadcast to the tokens, not whitened again (verl's GRPO:
    a group whose rewards are all equal gets 0). `world_sum` sums a list of numbers over the data-parallel
    replicas (the identity on one process)."""
    rewards_t = torch.tensor(rewards, dtype=torch.float32)
    mask = torch.nn.utils.rnn.pad_sequence([torch.ones(n) for n in response_len], batch_first=True)
    if alg.advantage == "gae":
        padded_values = torch.nn.utils.rnn.pad_sequence(values, batch_first=True)
        token_rewards = adv_fns.outcome_rewards_to_tokens(rewards_t, mask)
        advantages, returns = adv_fns.gae(token_rewards, padded_values, mask, alg.gamma, alg.lam)
    else:
        group_adv = adv_fns.grpo_advantages(rewards_t.view(-1, group_size))
        advantages = adv_fns.broadcast_to_tokens(group_adv.reshape(-1), mask)
        returns = torch.zeros_like(advantages)
    sums = torch.tensor(world_sum(adv_fns.masked_moment_sums(advantages, mask).tolist()), dtype=torch.float64)
    if alg.advantage == "gae" and alg.normalize_advantages:
        advantages = adv_fns.normalize_advantages(advantages, mask, stats=adv_fns.moments_from_sums(sums))
    return ([advantages[i, :n] for i, n in enumerate(response_len)],
            [returns[i, :n] for i, n in enumerate(response_len)], float(sums[2]))


def scatter_to_positions(per_sample: list[torch.Tensor], targets: torch.Tensor) -> torch.Tensor:
    """Per-sample response vectors -> one [T] tensor at the packed row's loss positions (0 elsewhere)."""
    out = torch.zeros(targets.shape[0], dtype=torch.float32, device=targets.device)
    positions = (targets != IGNORE_INDEX).nonzero().squeeze(-1)
    flat = torch.cat(per_sample) if per_sample else torch.zeros(0)
    if flat.numel() != positions.numel():
        raise RuntimeError(f"{flat.numel()} response values for {positions.numel()} loss positions")
    out[positions] = flat.to(out.device, torch.float32)
    return out


def gather_from_positions(values: torch.Tensor, targets: torch.Tensor, lengths: list[int]) -> list[torch.Tensor]:
    picked = values[targets != IGNORE_INDEX].detach().float().cpu()
    return list(torch.split(picked, lengths))


def make_micro_batch(collator: Collator, batch: RolloutBatch, group: list[int]):
    if not group:  # padding micro-batch: one token, no loss (keeps collectives in step across ranks)
        empty = TokenizedSample([batch.samples[0].tokens.input_ids[0]], [], [], [], "<padding>")
        return collator([empty]).to(dist.device())
    return collator([batch.samples[i].tokens for i in group], group).to(dist.device())


SAMPLES_PER_STEP_LOGGED = 4


def log_samples(out_dir: str, step: int, prompts: list, batch: RolloutBatch) -> None:
    with open(os.path.join(out_dir, "samples.jsonl"), "a") as f:
        for s in batch.samples[:SAMPLES_PER_STEP_LOGGED]:
            p = prompts[s.prompt]
            f.write(json.dumps({"step": step, "id": p.id, "answer": p.answer, "response": s.text,
                                "finish_reason": s.finish_reason, "score": s.reward, "reason": s.reason}) + "\n")


def step_metrics(batch: RolloutBatch, policy_stats: dict, critic_stats: dict, policy, has_critic: bool) -> dict:
    """Global metrics of the step: every rank contributes sums, summed over the data-parallel replicas."""
    samples = batch.samples
    n = len(samples)
    lengths = torch.tensor(batch.column("response_len"), dtype=torch.float64)
    gap = [(s.rollout_logprobs - s.old_logprobs).abs() for s in samples
           if s.rollout_logprobs.numel() == s.old_logprobs.numel()]
    gap_all = torch.cat(gap) if gap else torch.zeros(0)
    local = {
        "n": n, "reward_sum": sum(s.reward for s in samples), "correct_sum": sum(s.reason == "correct" for s in samples),
        "length_sum": float(lengths.sum()), "truncated_sum": sum(not s.finished for s in samples),
        "gap_sum": float(gap_all.sum()), "gap_n": gap_all.numel(),
        "_tokens": float(sum(len(s.tokens.input_ids) for s in samples)),
        **{f"p_{k}": v for k, v in policy_stats.items() if k != "ratio_max"},
        **{f"c_{k}": v for k, v in critic_stats.items()},
    }
    keys = sorted(local)
    reduced = dict(zip(keys, policy.dp_sum([float(local[k]) for k in keys])))
    out = {
        "reward": reduced["reward_sum"] / reduced["n"],
        "accuracy": reduced["correct_sum"] / reduced["n"],
        "response_length": reduced["length_sum"] / reduced["n"],
        "response_length_max": dist.all_reduce_max(float(lengths.max()) if n else 0.0),
        "truncation_rate": reduced["truncated_sum"] / reduced["n"],
        "rollout_logprob_gap_mean": reduced["gap_sum"] / max(1.0, reduced["gap_n"]),
        "rollout_logprob_gap_max": dist.all_reduce_max(float(gap_all.max()) if gap_all.numel() else 0.0),
        "policy/ratio_max": dist.all_reduce_max(policy_stats.get("ratio_max", 0.0)),
        "_tokens": reduced["_tokens"],
    }
    policy_reduced = {k[2:]: torch.tensor(v) for k, v in reduced.items() if k.startswith("p_")}
    out.update({f"policy/{k}": v for k, v in losses.finalize_stats(policy_reduced).items() if k != "num_tokens"})
    if has_critic:
        critic_reduced = {k[2:]: torch.tensor(v) for k, v in reduced.items() if k.startswith("c_")}
        out.update({f"critic/{k}": v for k, v in losses.finalize_stats(critic_reduced).items() if k != "num_tokens"})
        values, returns = torch.cat(batch.column("values")), torch.cat(batch.column("returns"))
        ev = losses.explained_variance(values[None], returns[None], torch.ones_like(values)[None])
        out["critic/explained_variance"] = float(ev)
    out.update(per_source_accuracy(samples, policy))
    return out


def per_source_accuracy(samples: list[RolloutSample], policy) -> dict:
    """accuracy/<source> over the global batch (sources differ between ranks: their names are gathered)."""
    local = defaultdict(lambda: [0.0, 0.0])
    for s in samples:
        local[s.source][0] += s.reason == "correct"
        local[s.source][1] += 1
    names = [sorted(local)]
    if torch.distributed.is_initialized():
        names = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(names, sorted(local))
    sources = sorted({src for ranks in names for src in ranks})
    sums = policy.dp_sum([x for src in sources for x in local.get(src, (0.0, 0.0))])
    return {f"accuracy/{src}": sums[2 * k] / sums[2 * k + 1] for k, src in enumerate(sources) if sums[2 * k + 1]}
