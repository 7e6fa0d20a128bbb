"""The megatron-core engine on gloo processes (CPU shims from tests/engines/mcore_cpu/shims.py):
HF vs megatron log-probs at TP 2, PP 2 and TP 2 x PP 2 with an image, streamed parameters, training steps
against the DeepSpeed engine, and save -> resume."""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

pytest.importorskip("megatron.core", reason="megatron-core is not installed (pip install -e '.[megatron]')")

from ovr_hpc.engines.base import full_state_dict  # noqa: E402

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    """Tiny Qwen2.5-VL with 2 KV heads (TP 2 splits whole groups) and 3 layers (uneven at PP 2)."""
    from ovr_hpc.models.tiny import build_tiny_model

    return str(build_tiny_model(tmp_path_factory.mktemp("mcore_engine") / "model", seed=0, hidden_size=128,
                                num_layers=3, num_heads=4, num_kv_heads=2, intermediate_size=256))


def _micro_batches(model_dir: str, image_dir: str):
    """Two packed micro-batches: the image sample (56x112: distinct height / width positions, loss after the
    image) with a text sample, and a text-only one (a dummy image runs the vision tower)."""
    from ovr_hpc.data.dataset import Collator
    from ovr_hpc.data.synthetic import engine_check_samples
    from ovr_hpc.models.loading import load_processor

    processor = load_processor(model_dir, 3136, 50176)
    with_image, text, text2 = engine_check_samples(processor.tokenizer, image_dir)
    collator = Collator(processor, 3136, 50176, always_run_vision=True)
    return [collator([with_image, text]), collator([text2])]


def _init(rank: int, world: int, port: int) -> None:
    from tests.engines.mcore_cpu import shims

    shims.install()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)


def _configs(engine: str, tp: int = 1, pp: int = 1, lr: float = 2e-3, sp: bool = False, recompute: bool = False):
    from ovr_hpc.config import ModelConfig, OptimizerConfig, RLParallelConfig, ScheduleConfig

    model = ModelConfig(dtype="float32", attn_implementation="sdpa", freeze_vision=False,
                        gradient_checkpointing=recompute)
    if engine == "megatron":
        parallel = RLParallelConfig(engine="megatron", tensor_parallel_size=tp, pipeline_parallel_size=pp,
                                    megatron_spec="local", sequence_parallel=sp)
    else:
        parallel = RLParallelConfig(zero_stage=2)
    # Adam's eps well above float noise: gradients that are exactly zero in theory (the key bias's: softmax
    # ignores a per-query constant) are rounding noise, which eps=1e-8 would blow up to full lr-sized steps
    optimizer = OptimizerConfig(lr=lr, eps=1e-5, grad_clip=0.05)
    return model, parallel, optimizer, ScheduleConfig(kind="cosine", warmup_steps=1)


def _token_mean_loss(micro):
    total = sum(mb.num_loss_tokens for mb in micro)
    return lambda j, out: (-out[0].sum() / total, {"loss_sum": -out[0].sum()})


def _train(engine, micro, steps: int) -> list[float]:
    losses = []
    for _ in range(steps):
        stats = engine.forward_backward(micro, _token_mean_loss(micro))
        engine.step()
        losses.append(sum(s["loss_sum"] for s in stats) / sum(mb.num_loss_tokens for mb in micro))
    return losses


def _build(engine_kind, model_dir, tp=1, pp=1, role="policy", total_steps=8, sp=False, recompute=False):
    from ovr_hpc.engines.base import build_engine

    model, parallel, optimizer, schedule = _configs(engine_kind, tp, pp, sp=sp, recompute=recompute)
    model.path = model_dir
    world = torch.distributed.get_world_size()
    return build_engine(role, model, parallel, optimizer, schedule, total_steps, world, seed=3)


# ----------------------------------------------------------------------------- workers


def _worker_logprobs(rank, world, port, tp, pp, sp, model_dir, tmp):
    _init(rank, world, port)
    from ovr_hpc.models.loading import TokenLogprobs, load_vlm

    micro = _micro_batches(model_dir, tmp)
    hf = load_vlm(model_dir, "float32", "sdpa")
    engine = _build("megatron", model_dir, tp, pp, sp=sp)
    assert (engine.tp_size, engine.pp_size, engine.model_parallel_size) == (tp, pp, tp * pp)
    outputs = engine.forward(micro, temperature=0.7, return_entropy=True)
    for mb, (lp, ent) in zip(micro, outputs):
        with torch.no_grad():
            ref_lp, ref_ent = TokenLogprobs(hf)(**mb.model_inputs(), temperature=0.7, return_entropy=True)
        torch.testing.assert_close(lp, ref_lp, atol=1e-5, rtol=0)
        torch.testing.assert_close(ent, ref_ent, atol=1e-5, rtol=0)
    # the image changed the answer: its tokens reached the language model
    assert (outputs[0][0] != 0).sum() > 0

    # streamed parameters == the HF state dict, names and values, on every rank
    reference = hf.state_dict()
    streamed = dict(engine.iter_full_params())
    assert sorted(streamed) == sorted(reference)
    for name, t in streamed.items():
        assert torch.equal(t, reference[name]), name
    full = full_state_dict(engine)
    assert (full is not None) == (rank == 0)

    # the critic: same backbone, value head initialised from the seed as load_critic does
    from ovr_hpc.models.loading import load_critic

    critic = _build("megatron", model_dir, tp, pp, role="critic", sp=sp)
    hf_critic = load_critic(model_dir, "float32", "sdpa", seed=3)
    for mb, values in zip(micro, critic.forward(micro)):
        with torch.no_grad():
            torch.testing.assert_close(values, hf_critic(**mb.model_inputs()), atol=1e-5, rtol=0)
    torch.distributed.destroy_process_group()


def _worker_train(rank, world, port, engine_kind, tp, pp, model_dir, tmp, out, sp=False):
    _init(rank, world, port)
    micro = _micro_batches(model_dir, tmp)
    engine = _build(engine_kind, model_dir, tp, pp, sp=sp)
    losses = _train(engine, micro, 4)
    norms = engine.grad_norm()
    state = full_state_dict(engine)
    if rank == 0:
        torch.save({"losses": losses, "grad_norm": norms, "state": state, "lr": engine.lr()}, out)
    torch.distributed.destroy_process_group()


def _worker_resume(rank, world, port, tp, pp, model_dir, tmp, out):
    _init(rank, world, port)
    micro = _micro_batches(model_dir, tmp)
    ckpt = os.path.join(tmp, "ckpt")
    engine = _build("megatron", model_dir, tp, pp)
    _train(engine, micro, 2)
    engine.save(ckpt, {"train_state": {"step": 2}})
    lr_at_save = engine.lr()
    straight = _train(engine, micro, 2)
    straight_state = full_state_dict(engine)

    resumed_engine = _build("megatron", model_dir, tp, pp)
    client = resumed_engine.load(ckpt)
    assert client == {"train_state": {"step": 2}}
    assert resumed_engine.lr() == pytest.approx(lr_at_save)
    resumed = _train(resumed_engine, micro, 2)
    resumed_state = full_state_dict(resumed_engine)
    if rank == 0:
        json.dump({"straight": straight, "resumed": resumed}, open(out, "w"))
        for name, t in straight_state.items():
            assert torch.equal(t, resumed_state[name]), name
    torch.distributed.destroy_process_group()


def _spawn(fn, world, *args):
    mp.spawn(fn, args=(world, _free_port(), *args), nprocs=world, join=True)


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("tp,pp,sp", [(2, 1, False), (1, 2, False), (2, 2, False), (2, 2, True)])
def test_logprobs_and_streamed_params_match_hf(model_dir, tmp_path, tp, pp, sp):
    """sp: sequence parallelism (the packed rows here have odd lengths: padded to split over TP)."""
    _spawn(_worker_logprobs, tp * pp, tp, pp, sp, model_dir, str(tmp_path))


@pytest.mark.parametrize("tp,dp,sp", [(2, 1, False), (2, 1, True), (1, 2, False)])
def test_training_matches_deepspeed(model_dir, tmp_path, tp, dp, sp):
    """4 AdamW steps (warm-up + cosine, clipping active) on the same data: megatron at TP 2 (with and
    without sequence parallelism: the norms' partial gradients summed over TP), and at DP 2 (every rank the
    same data; optimizer states sharded over the two ranks) vs DeepSpeed on one rank."""
    _spawn(_worker_train, 1, "deepspeed", 1, 1, model_dir, str(tmp_path), str(tmp_path / "ds.pt"))
    _spawn(_worker_train, tp * dp, "megatron", tp, 1, model_dir, str(tmp_path), str(tmp_path / "mc.pt"), sp)
    ds, mc = torch.load(tmp_path / "ds.pt"), torch.load(tmp_path / "mc.pt")
    assert ds["losses"][-1] < ds["losses"][0] - 0.05  # it trains
    assert mc["losses"] == pytest.approx(ds["losses"], abs=1e-5)
    assert mc["grad_norm"] == pytest.approx(ds["grad_norm"], rel=1e-4)
    assert mc["lr"] == pytest.approx(ds["lr"])
    assert sorted(mc["state"]) == sorted(ds["state"])
    for name, t in mc["state"].items():
        torch.testing.assert_close(t, ds["state"][name], atol=2e-5, rtol=0, msg=name)


@pytest.mark.parametrize("tp,pp,dp", [(2, 1, 1), (1, 2, 1), (1, 1, 2)])
def test_save_resume_continues_identically(model_dir, tmp_path, tp, pp, dp):
    out = tmp_path / "resume.json"
    _spawn(_worker_resume, tp * pp * dp, tp, pp, model_dir, str(tmp_path), str(out))
    result = json.load(open(out))
    assert result["resumed"] == result["straight"]


def _worker_reshard(rank, world, port, model_dir, tmp, out):
    """A TP 2 checkpoint loads at PP 2, and a PP 2 one at DP 2 (optimizer states sharded over DP ranks): the
    distributed checkpoint is layout-free: same weights, and the optimizer state carries over (the next
    steps' losses agree)."""
    from megatron.core import parallel_state as ps

    _init(rank, world, port)
    micro = _micro_batches(model_dir, tmp)
    ckpt = os.path.join(tmp, "ckpt_tp2")
    engine = _build("megatron", model_dir, 2, 1)
    _train(engine, micro, 2)
    engine.save(ckpt, {"train_state": {"step": 2}})
    saved = full_state_dict(engine)
    continued = _train(engine, micro, 2)
    del engine
    ps.destroy_model_parallel()

    engine = _build("megatron", model_dir, 1, 2)
    engine.load(ckpt)
    loaded = full_state_dict(engine)
    ckpt_pp2 = os.path.join(tmp, "ckpt_pp2")
    engine.save(ckpt_pp2, {"train_state": {"step": 2}})
    resumed = _train(engine, micro, 2)
    del engine
    ps.destroy_model_parallel()

    engine = _build("megatron", model_dir, 1, 1)  # DP 2
    engine.load(ckpt_pp2)
    loaded_dp2 = full_state_dict(engine)
    resumed_dp2 = _train(engine, micro, 2)
    if rank == 0:
        for name, t in saved.items():
            assert torch.equal(t, loaded[name]), name
            assert torch.equal(t, loaded_dp2[name]), name
        json.dump({"tp2": continued, "pp2": resumed, "dp2": resumed_dp2}, open(out, "w"))
    torch.distributed.destroy_process_group()


def test_tp2_checkpoint_resumes_at_pp2(model_dir, tmp_path):
    out = tmp_path / "reshard.json"
    _spawn(_worker_reshard, 2, model_dir, str(tmp_path), str(out))
    result = json.load(open(out))
    assert result["pp2"] == pytest.approx(result["tp2"], abs=1e-5)
    assert result["dp2"] == pytest.approx(result["tp2"], abs=1e-5)


def test_optimizer_owners_balance_elements():
    from ovr_hpc.engines.megatron.optimizer import owners_by_size

    params = [torch.zeros(n) for n in (100, 60, 50, 40, 10, 5)]
    owner = owners_by_size(params, 2)
    load = [sum(p.numel() for p in params if owner[id(p)] == r) for r in range(2)]
    assert load == [140, 125] and owner[id(params[0])] == 0  # 100+40 | 60+50+10+5
    assert set(owners_by_size(params, 8).values()) == set(range(6))  # more ranks than parameters: some own none


def _worker_gpu_bench(rank, world, port, model_dir, tmp, out):
    import sys

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "bench"))
    import megatron_gpu

    _init(rank, world, port)
    results = megatron_gpu.run_checks(model_dir, tmp, tp=2, pp=1, dtype="float32", spec="local")
    if rank == 0:
        json.dump(results, open(out, "w"))
    torch.distributed.destroy_process_group()


def test_gpu_bench_script_runs_on_cpu(model_dir, tmp_path):
    """bench/megatron_gpu.py's checks, in fp32 on the CPU: exact where the GPU run measures bf16 error."""
    out = tmp_path / "bench.json"
    _spawn(_worker_gpu_bench, 2, model_dir, str(tmp_path), str(out))
    r = json.load(open(out))
    assert r["spec"] == "local"
    assert r["logprobs_bf16"]["megatron_vs_fp32_max"] < 1e-5
    assert r["packed_vs_single"]["max_abs_diff"] < 1e-5
    assert r["optimizer_step"]["losses"][-1] < r["optimizer_step"]["losses"][0]


def _worker_recompute(rank, world, port, model_dir, tmp, out):
    _init(rank, world, port)
    micro = _micro_batches(model_dir, tmp)
    plain = _build("megatron", model_dir, 2, 1, sp=True)
    recomputed = _build("megatron", model_dir, 2, 1, sp=True, recompute=True)
    assert recomputed.stage.config.recompute_granularity == "full"
    a, b = _train(plain, micro, 2), _train(recomputed, micro, 2)
    sa, sb = full_state_dict(plain), full_state_dict(recomputed)
    if rank == 0:
        json.dump({"plain": a, "recompute": b}, open(out, "w"))
        for name, t in sa.items():
            torch.testing.assert_close(sb[name], t, atol=1e-6, rtol=0, msg=name)
    torch.distributed.destroy_process_group()


def test_activation_recompute_changes_nothing(model_dir, tmp_path):
    """model.gradient_checkpointing on the megatron engine: megatron-core's full per-layer recompute."""
    out = tmp_path / "recompute.json"
    _spawn(_worker_recompute, 2, model_dir, str(tmp_path), str(out))
    r = json.load(open(out))
    assert r["recompute"] == pytest.approx(r["plain"], abs=1e-6)
