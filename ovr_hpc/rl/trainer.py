"""THE RL LOOP: PPO with GAE and a separate critic, verifiable rewards, readable top to bottom.

build (ranks, prompts, policy, critic, rollout engine, reward workers) -> resume -> per step:
prompts -> rollouts -> rewards -> old log-probs and values -> advantages -> policy update ->
critic updates -> weights to the rollout engine -> metrics -> checkpoint / stop on request.

Each rank generates for its share of the step's prompts (all `samples_per_prompt` of a prompt on the
same rank, so group statistics stay local), and trains on what it generated. Sums that must be global
(advantage moments, token counts, metrics) are all-reduced; micro-batches are cut by a token budget and
every rank runs the same number of them (ZeRO-3 gathers parameters collectively).
"""

from __future__ import annotations

import math
import os
import time
from collections import defaultdict

import torch

from ovr_hpc import dist, preflight
from ovr_hpc.checkpoint import COMPLETE, checkpoints_dir, end_of_step, load_checkpoint, preempted, save_checkpoint
from ovr_hpc.config import RLConfig, dump_config, to_dict
from ovr_hpc.data.dataset import IGNORE_INDEX, Collator, rows_at
from ovr_hpc.data.templates import TokenizedSample
from ovr_hpc.engines.base import build_engine
from ovr_hpc.metrics import MetricsLogger
from ovr_hpc.models.loading import TokenLogprobs, load_processor, load_vlm
from ovr_hpc.rl import advantages as adv_fns
from ovr_hpc.rl import losses
from ovr_hpc.rl.prompts import load_rl_prompts, stop_strings, to_rollout_prompt
from ovr_hpc.grading import RewardPool
from ovr_hpc.rollout.base import RolloutInterrupted, SamplingParams
from ovr_hpc.sft.trainer import seed_everything


# ----------------------------------------------------------------------------- small helpers


def token_budget_batches(lengths: list[int], budget: int) -> list[list[int]]:
    """Consecutive sequences into micro-batches of at most `budget` tokens (a longer one goes alone)."""
    batches, current, used = [], [], 0
    for i, n in enumerate(lengths):
        if current and used + n > budget:
            batches.append(current)
            current, used = [], 0
        current.append(i)
        used += n
    if current:
        batches.append(current)
    return batches


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


class Rollouts:
    """One step's sequences on this rank: token ids, images, response lengths, rewards, and what the
    trainer computes for them (old log-probs, values, advantages, returns), per sample."""

    def __init__(self):
        self.samples: list[TokenizedSample] = []
        self.prompt_index: list[int] = []
        self.response_len: list[int] = []
        self.finished: list[bool] = []
        self.rewards: list[float] = []
        self.reasons: list[str] = []
        self.sources: list[str] = []
        self.vllm_logprobs: list[torch.Tensor] = []
        self.old_logprobs: list[torch.Tensor] = []
        self.ref_logprobs: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.advantages: list[torch.Tensor] = []
        self.returns: list[torch.Tensor] = []


# ----------------------------------------------------------------------------- the loop


def train(cfg: RLConfig) -> dict:
    # ---- where we are, and the stop flag
    info = dist.init_distributed()
    checks = preflight.at_start(cfg, info.world_size)   # every pre-run check, on this machine (ovr_hpc/preflight.py)
    stop = dist.StopRequest().install()
    seed_everything(cfg.seed)
    out_dir = cfg.checkpoint.output_dir
    os.makedirs(out_dir, exist_ok=True)
    log = print if info.is_main else (lambda *a, **k: None)
    alg, ro = cfg.algorithm, cfg.rollout
    device = dist.device()

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
    has_images = any(p.images for p in prompts)

    # ---- policy, critic, rollout engine, reward workers
    policy = build_engine("policy", cfg.model, cfg.parallel, cfg.optimizer, cfg.schedule, total_steps, info.world_size)
    engines = {"policy": policy}
    critic = None
    if alg.advantage == "gae":
        critic = build_engine("critic", cfg.model, cfg.parallel, cfg.critic.optimizer, cfg.schedule, total_steps,
                              info.world_size, model_path=cfg.critic.path, seed=cfg.seed)
        engines["critic"] = critic
    reference = None
    if alg.kl_coef > 0:  # a frozen copy of the initial policy, outside the engine
        reference = TokenLogprobs(load_vlm(cfg.model.path, cfg.model.dtype, cfg.model.attn_implementation)).to(device)
        reference.eval().requires_grad_(False)
    rollout = build_rollout_engine(cfg, processor, info)
    reward_pool = RewardPool(alg.reward_workers, alg.reward_timeout_s)
    collator = Collator(processor, cfg.data.min_pixels, cfg.data.max_pixels, always_run_vision=has_images)
    prompts_per_rank = ro.prompts_per_step // policy.dp_size
    stops = stop_strings(cfg.data, ro)

    # ---- resume; the rollout engine then serves the resumed weights, never the initial ones
    step, tokens_seen = 0, 0
    resume_from = checks.resume_from
    if resume_from:
        state = load_checkpoint(engines, resume_from)
        step, tokens_seen = state["step"], state["tokens_seen"]
        log(f"resumed from {resume_from} at step {step}")
    # the policy's weights (initial or resumed) into the rollout engine; vLLM starts with dummy weights
    rollout.load_weights(policy.iter_full_params())
    metrics = MetricsLogger(out_dir, info.is_main, cfg.logging, total_steps, resume_step=step,
                            run_config=to_dict(cfg))

    def save() -> None:
        save_checkpoint(engines, out_dir, step, {
            "step": step, "tokens_seen": tokens_seen, "prompts_consumed": step * ro.prompts_per_step,
            "max_response_len": ro.response_len_at(step)}, dump_config(cfg), cfg.model.path,
            cfg.checkpoint.keep_last, cfg.checkpoint.save_hf_weights)

    status: str | None = None  # stays None when a resumed run had already finished
    while step < total_steps:
        times, t_step = {}, time.perf_counter()

        # ---- 1. prompts of this step, this rank's share; generate
        t = time.perf_counter()
        ids = rows_at(step * ro.prompts_per_step, ro.prompts_per_step, len(prompts), cfg.seed, cfg.data.shuffle)
        mine = [prompts[i] for i in ids[policy.dp_rank * prompts_per_rank : (policy.dp_rank + 1) * prompts_per_rank]]
        params = SamplingParams(n=ro.samples_per_prompt, temperature=ro.temperature, top_p=ro.top_p,
                                max_new_tokens=ro.response_len_at(step), stop=stops,
                                seed=cfg.seed * 1_000_003 + step * 1009 + policy.dp_rank)
        try:
            completions = rollout.generate([to_rollout_prompt(p, cfg.data) for p in mine], params,
                                           should_stop=stop.agreed)
        except RolloutInterrupted:
            completions = None
        if hasattr(rollout, "sleep"):
            rollout.sleep()  # vLLM sleep mode: its weights and KV cache make room for the updates (or a save)
        times["generate"] = time.perf_counter() - t
        if completions is None:
            # a stop signal while generating: this step never happened (its rollouts are drawn again from
            # the same seeds after the resume); the checkpoint is the state the step started from
            moment = f" during the rollouts of step {step + 1}"
            if os.path.exists(os.path.join(checkpoints_dir(out_dir), f"step_{step}", COMPLETE)):
                status = preempted(stop, log, f"{moment}: step {step} is saved already")
            else:
                status = preempted(stop, log, f"{moment}: saving step {step}", save)
            break

        # ---- 2. rewards, in worker processes
        t = time.perf_counter()
        batch = Rollouts()
        items = []
        for k, (p, outs) in enumerate(zip(mine, completions)):
            for c in outs:
                batch.samples.append(TokenizedSample(c.prompt_ids + c.token_ids, [(len(c.prompt_ids), len(c.prompt_ids)
                                                     + len(c.token_ids))], p.images, p.image_sizes, p.where))
                batch.prompt_index.append(k)
                batch.response_len.append(len(c.token_ids))
                batch.finished.append(c.finish_reason == "stop")
                batch.sources.append(p.source)
                batch.vllm_logprobs.append(torch.tensor(c.logprobs, dtype=torch.float32))
                items.append((c.text, p.answer, p.answer_type, c.finish_reason == "stop"))
        results = reward_pool.score_batch(items)
        batch.rewards = [r.score for r in results]
        batch.reasons = [r.reason for r in results]
        times["reward"] = time.perf_counter() - t
        if info.is_main:  # a few responses per step, the first thing to read when rewards look wrong
            log_samples(out_dir, step + 1, mine, completions, results, ro.samples_per_prompt)

        # ---- 3. micro-batches (same count on every rank) and old log-probs / values
        t = time.perf_counter()
        lengths = [len(s.input_ids) for s in batch.samples]
        groups = token_budget_batches(lengths, alg.max_tokens_per_microbatch)
        num_micro = int(dist.all_reduce_max(len(groups)))
        groups += [[] for _ in range(num_micro - len(groups))]  # empty ones run a no-loss dummy forward
        micro = [make_micro_batch(collator, batch, g) for g in groups]
        old = policy.forward(micro, temperature=ro.temperature)
        old_values = critic.forward(micro) if critic is not None else [None] * len(micro)
        for g, mb, (lp, _), v in zip(groups, micro, old, old_values):
            batch.old_logprobs += gather_from_positions(lp, mb.targets, [batch.response_len[i] for i in g])
            if v is not None:
                batch.values += gather_from_positions(v, mb.targets, [batch.response_len[i] for i in g])
            if reference is not None:
                with torch.no_grad():
                    rlp, _ = reference(**mb.model_inputs(), temperature=ro.temperature)
                batch.ref_logprobs += gather_from_positions(rlp, mb.targets, [batch.response_len[i] for i in g])
        times["logprobs"] = time.perf_counter() - t

        # ---- 4. advantages: GAE over tokens, whitened over the global batch (ORZ); or GRPO's group-normalised
        #         rewards as they are (verl): a group whose rewards are all equal teaches nothing
        batch.advantages, batch.returns, num_tokens_global = step_advantages(
            alg, batch.rewards, batch.values, batch.response_len, ro.samples_per_prompt,
            lambda xs: [x / policy.model_parallel_size for x in dist.all_reduce_sum(xs)])
        normalizer = num_tokens_global / policy.loss_scale_for_mean()

        # ---- 5. policy update(s): token-level PPO over the global batch
        t = time.perf_counter()
        policy_stats = defaultdict(float)

        def policy_loss(j, output):
            lp, entropy = output
            g, mb = groups[j], micro[j]
            mask = (mb.targets != IGNORE_INDEX).float()
            old = scatter_to_positions([batch.old_logprobs[i] for i in g], mb.targets)
            adv = scatter_to_positions([batch.advantages[i] for i in g], mb.targets)
            loss, stats = losses.ppo_policy_loss(lp, old, adv, mask, alg.clip_eps, alg.clip_eps_high,
                                                 alg.dual_clip, normalizer=normalizer)
            if alg.entropy_coef:
                loss = loss - alg.entropy_coef * losses.masked_token_sum(entropy, mask, normalizer)
            if reference is not None:
                ref = scatter_to_positions([batch.ref_logprobs[i] for i in g], mb.targets)
                kl = losses.kl_penalty(lp, ref, alg.kl_kind)
                loss = loss + alg.kl_coef * losses.masked_token_sum(kl, mask, normalizer)
                stats["kl_ref_sum"] = (kl.detach() * mask).sum().double()
            stats["entropy_sum"] = (entropy.detach() * mask).sum().double()
            return loss, stats

        for _ in range(alg.policy_updates_per_step):
            for stats in policy.forward_backward(micro, policy_loss, temperature=ro.temperature, return_entropy=True):
                for k, v in stats.items():
                    policy_stats[k] = max(policy_stats[k], v) if k == "ratio_max" else policy_stats[k] + v
            policy.step()
        times["policy_update"] = time.perf_counter() - t

        # ---- 6. critic updates: one pass over the step's samples in `critic_updates_per_step` shuffled
        #         mini-batches, an optimizer step each (ORZ's critic_update_steps)
        t = time.perf_counter()
        critic_stats = defaultdict(float)
        if critic is not None:
            order = minibatch_split(len(batch.samples), alg.critic_updates_per_step,
                                    seed=cfg.seed * 1_000_003 + step * 1009 + policy.dp_rank)
            for samples in order:
                mb_groups = token_budget_batches([lengths[i] for i in samples], alg.max_tokens_per_microbatch)
                mb_groups = [[samples[i] for i in g] for g in mb_groups]
                mb_groups += [[] for _ in range(max(1, int(dist.all_reduce_max(len(mb_groups)))) - len(mb_groups))]
                mb_micro = [make_micro_batch(collator, batch, g) for g in mb_groups]
                mb_tokens = dist.all_reduce_sum([float(sum(batch.response_len[i] for i in samples))])[0]
                mb_normalizer = mb_tokens / policy.model_parallel_size / critic.loss_scale_for_mean()

                def critic_loss(j, v, mb_groups=mb_groups, mb_micro=mb_micro, mb_normalizer=mb_normalizer):
                    g, mb = mb_groups[j], mb_micro[j]
                    mask = (mb.targets != IGNORE_INDEX).float()
                    old_v = scatter_to_positions([batch.values[i] for i in g], mb.targets)
                    ret = scatter_to_positions([batch.returns[i] for i in g], mb.targets)
                    return losses.value_loss(v, old_v, ret, mask, alg.value_clip, normalizer=mb_normalizer)

                for stats in critic.forward_backward(mb_micro, critic_loss):
                    for k, v in stats.items():
                        critic_stats[k] += v
                critic.step()
        times["critic_update"] = time.perf_counter() - t

        # ---- 7. the new policy's weights to the rollout engine
        t = time.perf_counter()
        rollout.load_weights(policy.iter_full_params())
        times["sync"] = time.perf_counter() - t

        # ---- 8. metrics (sums all-reduced; per-source accuracy gathered)
        step += 1
        step_tokens = sum(lengths)
        values = step_metrics(batch, policy_stats, critic_stats, policy.model_parallel_size, critic is not None)
        tokens_seen += int(values.pop("_tokens"))
        seconds = time.perf_counter() - t_step
        values.update({f"time/{k}": v for k, v in times.items()})
        values.update({"time/step": seconds, "tokens_per_second": dist.all_reduce_sum([step_tokens])[0]
                       / policy.model_parallel_size / seconds, "lr": policy.lr(), "grad_norm": policy.grad_norm(),
                       "max_response_len": params.max_new_tokens, **report.as_metrics()})
        if critic is not None:
            values.update({"critic/lr": critic.lr(), "critic/grad_norm": critic.grad_norm()})
        metrics.log(step, values)

        # ---- 9. checkpoint / stop
        status = end_of_step(step, total_steps, cfg.checkpoint.every_steps, stop, save, log)
        if status:
            break
    if status == "completed":
        save()
    reward_pool.close()
    metrics.close()
    dist.barrier()
    return {"status": status or "completed", "step": step, "total_steps": total_steps}


SAMPLES_PER_STEP_LOGGED = 4


def log_samples(out_dir: str, step: int, prompts, completions, results, n: int) -> None:
    import json

    with open(os.path.join(out_dir, "samples.jsonl"), "a") as f:
        for k in range(min(SAMPLES_PER_STEP_LOGGED, len(results))):
            p, c, r = prompts[k // n], completions[k // n][k % n], results[k]
            f.write(json.dumps({"step": step, "id": p.id, "answer": p.answer, "response": c.text,
                                "finish_reason": c.finish_reason, "score": r.score, "reason": r.reason}) + "\n")


def build_rollout_engine(cfg: RLConfig, processor, info):
    if cfg.rollout.engine == "vllm":
        from ovr_hpc.rollout.vllm import VLLMRolloutEngine

        return VLLMRolloutEngine.from_config(cfg, processor, info)
    from ovr_hpc.rollout.hf import HFRolloutEngine

    model = load_vlm(cfg.model.path, cfg.model.dtype, cfg.model.attn_implementation).to(dist.device())
    model.config.use_cache = True  # the trainer's copies turn the cache off; generation wants it
    return HFRolloutEngine(model, processor, cfg.data.min_pixels, cfg.data.max_pixels, cfg.rollout.batch_size)


def make_micro_batch(collator: Collator, batch: Rollouts, group: list[int]):
    if not group:  # padding micro-batch: one token, no loss (keeps collectives in step across ranks)
        empty = TokenizedSample([batch.samples[0].input_ids[0]], [], [], [], "<padding>")
        return collator([empty]).to(dist.device())
    return collator([batch.samples[i] for i in group], group).to(dist.device())


def step_metrics(batch: Rollouts, policy_stats: dict, critic_stats: dict, replica_ranks: int, has_critic: bool) -> dict:
    """Global metrics of the step: every rank contributes sums; the `replica_ranks` ranks that share one
    data shard (tensor / pipeline parallelism) are divided out."""
    n = len(batch.rewards)
    lengths = torch.tensor(batch.response_len, dtype=torch.float64)
    gap = [(a - b).abs() for a, b in zip(batch.vllm_logprobs, batch.old_logprobs) if a.numel() == b.numel()]
    gap_all = torch.cat(gap) if gap else torch.zeros(0)
    local = {
        "n": n, "reward_sum": sum(batch.rewards), "correct_sum": sum(r == "correct" for r in batch.reasons),
        "length_sum": float(lengths.sum()), "truncated_sum": sum(not f for f in batch.finished),
        "gap_sum": float(gap_all.sum()), "gap_n": gap_all.numel(),
        "_tokens": float(sum(len(s.input_ids) for s in batch.samples)),
        **{f"p_{k}": v for k, v in policy_stats.items() if k != "ratio_max"},
        **{f"c_{k}": v for k, v in critic_stats.items()},
    }
    keys = sorted(local)
    reduced = dict(zip(keys, (x / replica_ranks for x in dist.all_reduce_sum([float(local[k]) for k in keys]))))
    length_max = dist.all_reduce_max(float(lengths.max()) if n else 0.0)
    gap_max = dist.all_reduce_max(float(gap_all.max()) if gap_all.numel() else 0.0)
    ratio_max = dist.all_reduce_max(policy_stats.get("ratio_max", 0.0))
    out = {
        "reward": reduced["reward_sum"] / reduced["n"],
        "accuracy": reduced["correct_sum"] / reduced["n"],
        "response_length": reduced["length_sum"] / reduced["n"],
        "response_length_max": length_max,
        "truncation_rate": reduced["truncated_sum"] / reduced["n"],
        "rollout_logprob_gap_mean": reduced["gap_sum"] / max(1.0, reduced["gap_n"]),
        "rollout_logprob_gap_max": gap_max,
        "policy/ratio_max": ratio_max,
        "_tokens": reduced["_tokens"],
    }
    policy_reduced = {k[2:]: torch.tensor(v) for k, v in reduced.items() if k.startswith("p_")}
    out.update({f"policy/{k}": v for k, v in losses.finalize_stats(policy_reduced).items() if k != "num_tokens"})
    if has_critic:
        critic_reduced = {k[2:]: torch.tensor(v) for k, v in reduced.items() if k.startswith("c_")}
        out.update({f"critic/{k}": v for k, v in losses.finalize_stats(critic_reduced).items() if k != "num_tokens"})
        values = torch.cat(batch.values) if batch.values else torch.zeros(0)
        returns = torch.cat(batch.returns) if batch.returns else torch.zeros(0)
        ev = losses.explained_variance(values[None], returns[None], torch.ones_like(values)[None])
        out["critic/explained_variance"] = float(ev)
    per_source = defaultdict(lambda: [0.0, 0])
    for src, r in zip(batch.sources, batch.reasons):
        per_source[src][0] += r == "correct"
        per_source[src][1] += 1
    gathered = [dict(per_source)]
    if torch.distributed.is_initialized():
        gathered = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, dict(per_source))
    merged = defaultdict(lambda: [0.0, 0])
    for d in gathered:
        for src, (c, m) in d.items():
            merged[src][0] += c / replica_ranks
            merged[src][1] += m / replica_ranks
    out.update({f"accuracy/{src}": c / m for src, (c, m) in merged.items() if m})
    return out
