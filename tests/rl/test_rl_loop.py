"""The RL loop's pieces around the pure maths: micro-batching, the critic, weight sync, whole runs."""

import json
import os
import time

import pytest
import torch

from ovr_hpc.data.dataset import IGNORE_INDEX
from ovr_hpc.config import AlgorithmConfig
from ovr_hpc.rl.trainer import (gather_from_positions, minibatch_split, scatter_to_positions, step_advantages,
                               token_budget_batches)
from tests.conftest import REPO

RL_CONFIG = os.path.join(REPO, "configs", "tiny", "rl.yaml")


def test_token_budget_batches():
    assert token_budget_batches([3, 4, 2, 9, 1], 7) == [[0, 1], [2], [3], [4]]
    assert token_budget_batches([], 7) == []
    assert sorted(i for b in token_budget_batches(list(range(1, 30)), 40) for i in b) == list(range(29))


def test_scatter_and_gather_are_inverse():
    targets = torch.tensor([IGNORE_INDEX, 5, 6, IGNORE_INDEX, IGNORE_INDEX, 7, IGNORE_INDEX])
    per_sample = [torch.tensor([1.0, 2.0]), torch.tensor([3.0])]
    flat = scatter_to_positions(per_sample, targets)
    assert flat.tolist() == [0, 1, 2, 0, 0, 3, 0]
    assert [t.tolist() for t in gather_from_positions(flat, targets, [2, 1])] == [[1.0, 2.0], [3.0]]
    with pytest.raises(RuntimeError, match="3 response values for 2 loss positions"):
        scatter_to_positions(per_sample, targets[:4])


def test_minibatch_split_is_one_shuffled_pass():
    parts = minibatch_split(10, 4, seed=3)
    assert [len(p) for p in parts] == [3, 3, 2, 2]
    assert sorted(i for p in parts for i in p) == list(range(10))  # every sample once: one pass
    assert all(p == sorted(p) for p in parts)
    assert parts == minibatch_split(10, 4, seed=3) and parts != minibatch_split(10, 4, seed=4)
    assert [len(p) for p in minibatch_split(2, 4, seed=0)] == [1, 1, 0, 0]  # every rank still steps 4 times


def _same(xs):
    return xs


def test_grpo_advantages_are_group_normalised_and_not_whitened_again():
    alg = AlgorithmConfig(advantage="grpo", normalize_advantages=True)
    rewards = [1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0]  # group 2: all right, nothing to learn from it
    adv, returns, n = step_advantages(alg, rewards, [], [2, 1, 3, 1, 2, 2, 1, 1], 4, _same)
    std = torch.tensor([1.0, 0, 0, 0]).std().item()
    assert torch.allclose(adv[0], torch.full((2,), 0.75 / (std + 1e-6)))
    assert torch.allclose(adv[1], torch.full((1,), -0.25 / (std + 1e-6)))
    assert all(float(a.abs().sum()) == 0 for a in adv[4:])
    assert n == 13 and all(float(r.abs().sum()) == 0 for r in returns)


def test_gae_advantages_are_whitened_over_the_world_batch():
    alg = AlgorithmConfig(advantage="gae", normalize_advantages=True)
    values = [torch.tensor([0.5, 0.5]), torch.tensor([0.2]), torch.tensor([0.0, 0.1, 0.2])]
    raw = torch.cat([1 - values[0], 0 - values[1], 1 - values[2]])  # gamma = lambda = 1: A_t = R - V_t
    adv, returns, n = step_advantages(alg, [1.0, 0.0, 1.0], values, [2, 1, 3], 1, _same)
    flat = torch.cat(adv)
    assert torch.allclose(flat, (raw - raw.mean()) / raw.var(unbiased=False).add(1e-8).sqrt(), atol=1e-6)
    assert [r.tolist() for r in returns] == [[1.0, 1.0], [0.0], [1.0, 1.0, 1.0]] and n == 6
    # the statistics are the world's: a second replica with the same batch changes nothing, one with
    # another batch does
    twice = step_advantages(alg, [1.0, 0.0, 1.0], values, [2, 1, 3], 1, lambda xs: [2 * x for x in xs])
    assert torch.allclose(torch.cat(twice[0]), flat) and twice[2] == 12


@pytest.mark.slow
def test_critic_learns_a_constant_reward(tiny_model_dir, processor):
    from ovr_hpc.data.dataset import Collator
    from ovr_hpc.data.templates import TokenizedSample
    from ovr_hpc.models.loading import load_critic
    from ovr_hpc.rl.losses import value_loss

    critic = load_critic(tiny_model_dir, "float32", "sdpa")
    ids = processor.tokenizer("What is two plus two? The answer is four.")["input_ids"]
    mb = Collator(processor, 3136, 50176)([TokenizedSample(ids, [(4, len(ids))])])
    mask = (mb.targets != IGNORE_INDEX).float()
    opt = torch.optim.Adam(critic.parameters(), lr=3e-3)
    for _ in range(60):
        values = critic(**mb.model_inputs())
        loss, _ = value_loss(values, values.detach(), torch.full_like(values, 0.7), mask, clip_eps=None)
        opt.zero_grad()
        loss.backward()
        opt.step()
    final = critic(**mb.model_inputs())[mask.bool()]
    assert (final - 0.7).abs().max() < 0.05


def test_weight_sync_serves_the_updated_policy(tiny_model_dir, processor, monkeypatch):
    """After an optimizer step, the rollout engine holds exactly the trainer's new weights."""
    from ovr_hpc import dist
    from ovr_hpc.config import OptimizerConfig, RLParallelConfig, ScheduleConfig
    from ovr_hpc.engines.deepspeed import DeepSpeedEngine
    from ovr_hpc.local import free_port
    from ovr_hpc.models.loading import TokenLogprobs, load_vlm
    from ovr_hpc.data.prompts import Prompt
    from ovr_hpc.rollout.base import SamplingParams
    from ovr_hpc.rollout.hf import HFRolloutEngine

    for k in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_STEP_ID"):
        monkeypatch.delenv(k, raising=False)
    if not torch.distributed.is_initialized():
        monkeypatch.setenv("MASTER_PORT", str(free_port()))
    dist.init_distributed()
    model = load_vlm(tiny_model_dir, "float32", "sdpa")
    engine = DeepSpeedEngine(TokenLogprobs(model), RLParallelConfig(zero_stage=2), OptimizerConfig(lr=5e-2),
                             "float32", 1, 10, ScheduleConfig(kind="constant"),
                             external_params=(model.lm_head.weight,))
    rollout = HFRolloutEngine(load_vlm(tiny_model_dir, "float32", "sdpa"), processor, 3136, 50176)
    prompt = [Prompt("Say something.")]
    before = rollout.generate(prompt, SamplingParams(temperature=0, max_new_tokens=8))[0][0].token_ids

    from ovr_hpc.data.dataset import Collator
    from ovr_hpc.data.templates import TokenizedSample

    ids = processor.tokenizer("one two three four")["input_ids"]
    mb = Collator(processor, 3136, 50176)([TokenizedSample(ids, [(1, len(ids))])])
    engine.forward_backward([mb], lambda j, out: (-out[0].sum(), {}))
    engine.step()

    rollout.load_weights(engine.iter_full_params())
    trained = dict(engine.engine.module.named_parameters())
    for name, p in rollout.model.named_parameters():
        assert torch.equal(p, trained[f"model.{name}"]), name
    after = rollout.generate(prompt, SamplingParams(temperature=0, max_new_tokens=8))[0][0].token_ids
    assert after != before


# ----------------------------------------------------------------------------- whole runs (2 gloo ranks)

def _rl_overrides(model_dir, data, out, *extra):
    return [f"model.path={model_dir}", f"data.train_files=[{data}]", f"checkpoint.output_dir={out}",
            "logging.progress_bar=false", "rollout.prompts_per_step=4", "rollout.samples_per_prompt=2",
            "rollout.max_response_len=[[0,6],[3,8]]", "algorithm.critic_updates_per_step=2",
            "algorithm.reward_workers=1", "checkpoint.every_steps=100", *extra]


@pytest.fixture
def color_file(tmp_path):
    from ovr_hpc.data.synthetic import write_color_rl

    return write_color_rl(str(tmp_path / "color.jsonl"), 24, seed=0)


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("zero_stage", [3])
def test_rl_stop_and_resume_is_exact(tiny_model_dir, color_file, tmp_path, zero_stage):
    import signal

    from ovr_hpc.local import start_ranks, wait_ranks
    from ovr_hpc.metrics import read_metrics

    full, half = str(tmp_path / "full"), str(tmp_path / "half")
    extra = ["schedule.max_steps=5", f"parallel.zero_stage={zero_stage}"]
    assert wait_ranks(start_ranks("rl", RL_CONFIG, _rl_overrides(tiny_model_dir, color_file, full, *extra), 2,
                                  os.path.join(full, "logs"))) == 0
    procs = start_ranks("rl", RL_CONFIG, _rl_overrides(tiny_model_dir, color_file, half, *extra), 2,
                        os.path.join(half, "logs"))
    deadline = time.time() + 600
    while time.time() < deadline and not (os.path.exists(os.path.join(half, "metrics.jsonl"))
                                          and len(read_metrics(half)) >= 2):
        time.sleep(0.1)
    procs[0].send_signal(signal.SIGUSR1)
    assert wait_ranks(procs) == 75
    state = json.load(open(os.path.join(half, "checkpoints", "latest", "train_state.json")))
    assert 2 <= state["step"] < 5 and os.path.isdir(os.path.join(half, "checkpoints", "latest", "critic"))
    assert wait_ranks(start_ranks("rl", RL_CONFIG, _rl_overrides(tiny_model_dir, color_file, half, *extra), 2,
                                  os.path.join(half, "logs"))) == 0
    keys = ["reward", "response_length", "policy/pg_loss", "critic/vf_loss", "max_response_len"]
    a = [[m[k] for k in keys] for m in read_metrics(full)]
    b = [[m[k] for k in keys] for m in read_metrics(half)]
    assert a == b and len(a) == 5
    assert [m["max_response_len"] for m in read_metrics(full)] == [6, 6, 6, 8, 8]


@pytest.mark.slow
def test_rl_grpo_single_process(tiny_model_dir, color_file, tmp_path):
    from ovr_hpc.local import run_local
    from ovr_hpc.metrics import read_metrics

    out = str(tmp_path / "grpo")
    assert run_local("rl", RL_CONFIG, _rl_overrides(tiny_model_dir, color_file, out, "algorithm.advantage=grpo",
                                                    "schedule.max_steps=2", "parallel.zero_stage=2"), nprocs=1,
                     log_dir=os.path.join(out, "logs")) == 0
    m = read_metrics(out)
    assert len(m) == 2 and "critic/vf_loss" not in m[0] and m[0]["rollout_logprob_gap_max"] < 1e-4
    assert not os.path.isdir(os.path.join(out, "checkpoints", "latest", "critic"))


@pytest.mark.slow
def test_rl_stop_during_rollouts_saves_the_step_start_and_resumes_exactly(tiny_model_dir, color_file, tmp_path,
                                                                          monkeypatch):
    """A signal while generating (the long part of an RL step) stops the run at once: the step never
    happened, the checkpoint is the state it started from, and the resumed run equals an uninterrupted one."""
    import signal

    from ovr_hpc.config import load_config
    from ovr_hpc.local import free_port
    from ovr_hpc.metrics import read_metrics
    from ovr_hpc.rl.trainer import train
    from ovr_hpc.rollout.hf import HFRolloutEngine

    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_STEP_ID"):
        monkeypatch.delenv(k, raising=False)
    if not torch.distributed.is_initialized():
        monkeypatch.setenv("MASTER_PORT", str(free_port()))
    full, half = str(tmp_path / "full"), str(tmp_path / "half")

    def cfg(out):   # one rank, 4 prompts per step generated one at a time: stop checks between them
        return load_config("rl", RL_CONFIG, _rl_overrides(tiny_model_dir, color_file, out, "schedule.max_steps=4",
                                                          "parallel.zero_stage=2", "rollout.batch_size=1"))

    assert train(cfg(full))["status"] == "completed"
    chunks, real_chunk = [], HFRolloutEngine._generate_chunk

    def signal_in_step_3(self, *args):
        chunks.append(args)
        if len(chunks) == 4 * 2 + 2:   # the 2nd prompt of step 3
            os.kill(os.getpid(), signal.SIGUSR1)
        return real_chunk(self, *args)

    monkeypatch.setattr(HFRolloutEngine, "_generate_chunk", signal_in_step_3)
    assert train(cfg(half)) == {"status": "preempted", "step": 2, "total_steps": 4}
    assert len(chunks) == 10   # the 3rd and 4th prompts of step 3 were never generated
    assert json.load(open(os.path.join(half, "checkpoints", "latest", "train_state.json")))["step"] == 2
    assert len(read_metrics(half)) == 2

    monkeypatch.setattr(HFRolloutEngine, "_generate_chunk", real_chunk)
    assert train(cfg(half))["status"] == "completed"
    keys = ["reward", "response_length", "policy/pg_loss", "critic/vf_loss", "max_response_len"]
    assert [[m[k] for k in keys] for m in read_metrics(half)] == [[m[k] for k in keys] for m in read_metrics(full)]


@pytest.mark.slow
def test_critic_updates_are_one_pass_in_shuffled_minibatches(tiny_model_dir, color_file, tmp_path, monkeypatch):
    """critic_updates_per_step = N (ORZ's critic_update_steps): the step's samples once, in N mini-batches with
    an optimizer step each; the policy: one update over all of them."""
    from ovr_hpc.config import load_config
    from ovr_hpc.engines.deepspeed import DeepSpeedEngine
    from ovr_hpc.local import free_port
    from ovr_hpc.rl.trainer import train

    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_STEP_ID"):
        monkeypatch.delenv(k, raising=False)
    if not torch.distributed.is_initialized():
        monkeypatch.setenv("MASTER_PORT", str(free_port()))
    calls = []
    real_fb, real_step = DeepSpeedEngine.forward_backward, DeepSpeedEngine.step

    def forward_backward(self, micro_batches, loss_fn, **kwargs):
        tokens = sum(int((mb.targets != IGNORE_INDEX).sum()) for mb in micro_batches)
        calls.append(("fb", "policy" if kwargs else "critic", tokens))
        return real_fb(self, micro_batches, loss_fn, **kwargs)

    def step(self):
        calls.append(("step", calls[-1][1], 0))
        return real_step(self)

    monkeypatch.setattr(DeepSpeedEngine, "forward_backward", forward_backward)
    monkeypatch.setattr(DeepSpeedEngine, "step", step)
    out = str(tmp_path / "run")
    cfg = load_config("rl", RL_CONFIG, _rl_overrides(tiny_model_dir, color_file, out, "schedule.max_steps=1",
                                                     "parallel.zero_stage=2", "rollout.samples_per_prompt=3",
                                                     "algorithm.critic_updates_per_step=4"))
    assert train(cfg)["status"] == "completed"
    policy = [c for c in calls if c[1] == "policy"]
    critic = [c for c in calls if c[1] == "critic"]
    assert [c[0] for c in policy] == ["fb", "step"]
    assert [c[0] for c in critic] == ["fb", "step"] * 4
    # 12 samples in 4 mini-batches of 3: together exactly the tokens the policy trained on, once
    assert sum(c[2] for c in critic) == policy[0][2] and all(c[2] > 0 for c in critic if c[0] == "fb")


def test_rl_prompts_are_checked_once_split_over_ranks(tiny_model_dir, processor, tmp_path, monkeypatch):
    """Rank r checks records r, r + W, ...; every rank reads all shards back in file order; a second call
    (a requeued job) decodes no image."""
    import ovr_hpc.rl.prompts as prompts_module
    from ovr_hpc.config import RLDataConfig
    from ovr_hpc.rl.prompts import load_rl_prompts
    from tests.conftest import write_jsonl, write_png

    write_png(tmp_path / "red.png")
    rows = [{"problem": f"<image>What is {i} + 1?" if i % 3 == 0 else f"What is {i} + 1?", "answer": str(i + 1),
             "images": ["red.png"] if i % 3 == 0 else []} for i in range(9)]
    rows[4] = {"problem": "no answer"}
    data = RLDataConfig(train_files=[write_jsonl(tmp_path / "rl.jsonl", rows)], min_pixels=3136, max_pixels=50176)
    one, one_report = load_rl_prompts(data, processor, tiny_model_dir, str(tmp_path / "one"))
    assert [p.answer for p in one] == ["1", "2", "3", "4", "6", "7", "8", "9"] and one_report.num_bad == 1

    # two ranks: rank 1's shard written first (as another process would), then rank 0 reads both
    real_prepare = prompts_module.prepare_prompt_shard

    def prepare_both(data_cfg, processor_, cache_root, folder, rank, world):
        real_prepare(data_cfg, processor_, cache_root, folder, 1, world)
        real_prepare(data_cfg, processor_, cache_root, folder, rank, world)

    monkeypatch.setattr(prompts_module, "prepare_prompt_shard", prepare_both)
    two, two_report = load_rl_prompts(data, processor, tiny_model_dir, str(tmp_path / "two"), rank=0, world=2)
    assert [(p.where, p.answer, p.image_sizes, p.num_tokens) for p in two] == \
        [(p.where, p.answer, p.image_sizes, p.num_tokens) for p in one]
    assert two_report.num_total == 9 and two_report.kinds == one_report.kinds
    monkeypatch.setattr(prompts_module, "prepare_prompt_shard", real_prepare)

    def no_decoding(*args, **kwargs):
        raise AssertionError("an image was decoded again")

    monkeypatch.setattr("ovr_hpc.data.vision.check_image", no_decoding)
    again, _ = load_rl_prompts(data, processor, tiny_model_dir, str(tmp_path / "one"))
    assert again == one
