"""Partial rollouts: the carried buffer of unfinished responses and its bookkeeping (pure, no I/O, no torch).

With `rollout.partial.enabled`, a step generates at most `tokens_per_step` tokens per sequence. A group
(the `samples_per_prompt` responses of one prompt, kept together so group statistics stay local) is
trained on in the step where its last sample finishes; until then its samples wait in the buffer, the
unfinished ones with their tokens, their sampling log-probs and the policy version (= the step whose
weights sampled them) of every token, and they are continued next step under the new weights.

The loss (decoupled PPO): the PPO ratio is taken against the old log-probs recomputed by the policy of the
training step (the proximal policy, as in the on-policy recipe), and each token sampled by an older
version carries a truncated importance weight min(exp(old - behaviour), is_cap), where behaviour is the
log-prob it was sampled with (`importance_weights`). Tokens of the current version weigh exactly 1, so a
step where nothing was carried is the on-policy step.

Staleness cap: a group whose oldest token is more than `max_staleness` versions old at the start of a
step is dropped (counted); it is never restarted, so nothing can loop forever on a long response.
With (max_staleness + 1) * tokens_per_step >= max_response_len no group is ever dropped.

Work balance: the step's new prompts go to the ranks so that every rank's expected tokens of the step are
equal (`assign_new_groups`). The expectation uses a memoryless length model (lengths exponential with the
running mean): a response that is already long is expected to go on as long as a new one, so every
unfinished sequence costs the same, mean * (1 - exp(-limit / mean)) tokens, limit = its tokens left this
step.

The buffer is saved in every checkpoint (one JSON file per rank, `to_json` / `from_json`): a resumed run
continues the same sequences and equals an uninterrupted one.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, field


@dataclass
class CarriedSample:
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)   # as sampled (the behaviour policy's)
    versions: list[int] = field(default_factory=list)     # the step whose weights sampled each token
    finish_reason: str | None = None                      # None while unfinished; "stop" | "length"
    text: str = ""                                        # the whole response so far (set when finished)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class CarriedGroup:
    prompt_id: int                  # index into the run's prompt list
    born: int                       # the step that started it
    samples: list[CarriedSample]
    prompt_ids: list[int] = field(default_factory=list)   # the rendered prompt's token ids (from the engine)

    @property
    def finished(self) -> bool:
        return all(s.finished for s in self.samples)

    def oldest_version(self) -> int:
        return min((s.versions[0] for s in self.samples if s.versions), default=self.born)


def new_group(prompt_id: int, step: int, n: int) -> CarriedGroup:
    return CarriedGroup(prompt_id, step, [CarriedSample() for _ in range(n)])


def staleness(group: CarriedGroup, step: int) -> int:
    """Policy versions between the group's oldest token and the weights of `step`."""
    return step - group.oldest_version()


def split_stale(groups: list[CarriedGroup], step: int, max_staleness: int
                ) -> tuple[list[CarriedGroup], list[CarriedGroup]]:
    """(kept, dropped): a group is dropped when its staleness at `step` exceeds max_staleness."""
    kept = [g for g in groups if staleness(g, step) <= max_staleness]
    return kept, [g for g in groups if staleness(g, step) > max_staleness]


def to_continue(groups: list[CarriedGroup]) -> list[tuple[int, int]]:
    """(group, sample) indices of the unfinished samples, in buffer order: this step's requests."""
    return [(gi, si) for gi, g in enumerate(groups) for si, s in enumerate(g.samples) if not s.finished]


def step_limit(sample: CarriedSample, tokens_per_step: int, max_response_len: int) -> int:
    """Tokens the sample may generate this step (its share of the step, and what its cap leaves)."""
    return max(0, min(tokens_per_step, max_response_len - len(sample.token_ids)))


def absorb(sample: CarriedSample, token_ids: list[int], logprobs: list[float], finish_reason: str, text: str,
           step: int, max_response_len: int) -> None:
    """A step's continuation of `sample` (new tokens only). "length" from the engine means the step's
    limit: the sample is finished only when it reached max_response_len (truncated) or stopped."""
    if len(logprobs) != len(token_ids):   # vLLM's log-probs may be missing: keep the lists aligned
        logprobs = (list(logprobs) + [0.0] * len(token_ids))[: len(token_ids)]
    sample.token_ids += list(token_ids)
    sample.logprobs += list(logprobs)
    sample.versions += [step] * len(token_ids)
    sample.text = text
    if finish_reason == "stop":
        sample.finish_reason = "stop"
    elif len(sample.token_ids) >= max_response_len:
        sample.finish_reason = "length"


def take_finished(groups: list[CarriedGroup]) -> tuple[list[CarriedGroup], list[CarriedGroup]]:
    """(finished, still carried), each in buffer order."""
    return [g for g in groups if g.finished], [g for g in groups if not g.finished]


def importance_weights(old_logprobs: list[float], behaviour_logprobs: list[float], versions: list[int], step: int,
                       cap: float) -> list[float]:
    """Per token: 1 where the token was sampled by the current version, else min(exp(old - behaviour), cap)."""
    return [1.0 if v == step else min(math.exp(min(o - b, 50.0)), cap)
            for o, b, v in zip(old_logprobs, behaviour_logprobs, versions)]


# ----------------------------------------------------------------------------- work balance


def expected_step_tokens(limit: int, mean_len: float) -> float:
    """E[min(L, limit)] for an exponential length of mean `mean_len` (the memoryless model above)."""
    if limit <= 0:
        return 0.0
    mean_len = max(mean_len, 1.0)
    return mean_len * (1.0 - math.exp(-limit / mean_len))


def assign_new_groups(loads: list[float], num_new: int, cost: float) -> list[int]:
    """The rank of each of `num_new` equal-cost new groups: one at a time to the least loaded rank (ties:
    the lowest rank). Every rank computes the same answer from the same loads."""
    loads = list(loads)
    ranks = []
    for _ in range(num_new):
        r = min(range(len(loads)), key=lambda k: (loads[k], k))
        ranks.append(r)
        loads[r] += cost
    return ranks


# ----------------------------------------------------------------------------- metrics


def staleness_counts(groups: list[CarriedGroup], step: int) -> dict[int, int]:
    """{staleness: tokens} of the trained groups' tokens (0 = sampled by the current weights)."""
    counts: Counter = Counter()
    for g in groups:
        for s in g.samples:
            counts.update(step - v for v in s.versions)
    return dict(counts)


def tail_seconds(finish_times: list[float], quantile: float = 0.9) -> float:
    """Seconds from the moment `quantile` of the samples were done to the last one."""
    if not finish_times:
        return 0.0
    times = sorted(finish_times)
    k = max(0, math.ceil(quantile * len(times)) - 1)
    return times[-1] - times[k]


# ----------------------------------------------------------------------------- checkpoint


def to_json(groups: list[CarriedGroup], mean_len: float | None) -> dict:
    """The buffer and the running mean response length (the balance's model), as JSON (floats round-trip
    exactly through Python's json)."""
    return {"version": 1, "mean_len": mean_len, "groups": [asdict(g) for g in groups]}


def from_json(data: dict) -> tuple[list[CarriedGroup], float | None]:
    if data.get("version") != 1:
        raise ValueError(f"unknown partial-rollout buffer version {data.get('version')!r}")
    groups = [CarriedGroup(g["prompt_id"], g["born"], [CarriedSample(**s) for s in g["samples"]], g["prompt_ids"])
              for g in data["groups"]]
    return groups, data["mean_len"]
