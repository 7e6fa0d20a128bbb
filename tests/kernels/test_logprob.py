"""fused_logprobs (torch backend, CPU) against the fp64 naive path; input validation."""

import math

import pytest
import torch

from ovr_hpc.kernels import fused_logprobs, logprobs_reference
from ovr_hpc.kernels import logprob as logprob_mod

from ._cases import check_against_reference, make_inputs

FP32_TOL = {"logp": 1e-4, "entropy": 1e-4, "grad_hidden": 1e-4, "grad_weight": 1e-4}
# On the CPU the bf16 GEMM rounds the logits to bf16 (as the naive bf16 path does): peaked logits
# near 50 are off by up to 0.125, hence the absolute log-prob tolerance.
BF16_TOL = {"logp": 0.3, "entropy": 0.1, "grad_hidden": 2e-2, "grad_weight": 2e-2}


@pytest.fixture
def small_chunks(monkeypatch):
    # 16 rows per chunk at V=1013, so the odd shapes below cross many chunk boundaries.
    monkeypatch.setattr(logprob_mod, "TORCH_CHUNK_BYTES", 4 * 1013 * 16)


@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.5])
@pytest.mark.parametrize("with_entropy", [False, True])
@pytest.mark.parametrize("peaked", [False, True])
def test_torch_backend_matches_fp64_reference(small_chunks, temperature, with_entropy, peaked):
    hidden, weight, targets = make_inputs(251, 67, 1013, peaked=peaked, ignore_every=5)
    check_against_reference(hidden, weight, targets, temperature, with_entropy, tol=FP32_TOL,
                            backend="torch")


def test_torch_backend_bf16(small_chunks):
    hidden, weight, targets = make_inputs(64, 67, 1013, dtype=torch.bfloat16, peaked=True,
                                          ignore_every=7)
    check_against_reference(hidden, weight, targets, 0.7, True, tol=BF16_TOL, backend="torch")


def test_auto_on_cpu_is_torch_and_matches():
    hidden, weight, targets = make_inputs(33, 16, 100)
    a = fused_logprobs(hidden, weight, targets, return_entropy=True)
    b = fused_logprobs(hidden, weight, targets, return_entropy=True, backend="torch")
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_reference_is_log_softmax():
    hidden, weight, targets = make_inputs(9, 8, 50, dtype=torch.float64)
    logp, ent = logprobs_reference(hidden, weight, targets, temperature=2.0, return_entropy=True)
    logits = hidden @ weight.T / 2.0
    probs = logits.softmax(-1)
    assert torch.allclose(logp, probs[torch.arange(9), targets].log())
    assert torch.allclose(ent, -(probs * probs.log()).sum(-1))


def test_sft_loss_gradient_matches_naive_cross_entropy():
    # What the SFT loss does: -sum(logprobs) / num_tokens with ignored non-assistant tokens.
    hidden, weight, targets = make_inputs(40, 16, 300, ignore_every=3)
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logp, _ = fused_logprobs(h1, w1, targets)
    (-logp.sum() / (targets != -100).sum()).backward()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    torch.nn.functional.cross_entropy(h2 @ w2.T, targets, ignore_index=-100).backward()
    assert torch.allclose(h1.grad, h2.grad, atol=1e-6) and torch.allclose(w1.grad, w2.grad, atol=1e-6)


def test_only_one_input_requires_grad():
    hidden, weight, targets = make_inputs(20, 8, 64)
    h = hidden.clone().requires_grad_()
    logp, ent = fused_logprobs(h, weight, targets, return_entropy=True)
    (logp.sum() + ent.sum()).backward()
    assert h.grad is not None and weight.grad is None
    w = weight.clone().requires_grad_()
    logp, _ = fused_logprobs(hidden, w, targets)
    logp.sum().backward()
    assert w.grad is not None


def test_all_targets_ignored_gives_zeros_and_zero_grads():
    hidden, weight, _ = make_inputs(6, 8, 64)
    targets = torch.full((6,), -100)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logp, ent = fused_logprobs(h, w, targets, return_entropy=True)
    assert (logp == 0).all() and (ent == 0).all()
    (logp.sum() + ent.sum()).backward()
    assert (h.grad == 0).all() and (w.grad == 0).all()


def test_entropy_of_uniform_is_log_v():
    hidden = torch.zeros(3, 4)
    weight = torch.randn(77, 4)
    _, ent = fused_logprobs(hidden, weight, torch.tensor([0, 5, 76]), return_entropy=True)
    assert torch.allclose(ent, torch.full((3,), math.log(77)), atol=1e-5)


@pytest.mark.parametrize("bad, message", [
    (dict(weight=torch.randn(50, 9)), "disagree on H"),
    (dict(hidden=torch.randn(2, 10, 8)), "hidden must be 2-D"),
    (dict(weight=torch.randn(50)), "weight must be 2-D"),
    (dict(targets=torch.zeros(10, 1, dtype=torch.long)), "targets must be 1-D"),
    (dict(targets=torch.zeros(9, dtype=torch.long)), "one entry per row"),
    (dict(targets=torch.full((10,), 50)), r"targets must be in \[0, 50\)"),
    (dict(targets=torch.full((10,), -1)), r"targets must be in \[0, 50\)"),
    (dict(targets=torch.zeros(10)), "int64 or int32"),
    (dict(weight=torch.randn(50, 8, dtype=torch.float64)), "share a dtype"),
    (dict(weight=torch.randn(50, 8, device="meta")), "one device"),
    (dict(temperature=0.0), "temperature"),
    (dict(backend="cuda"), "backend must be one of"),
    (dict(backend="triton"), "needs CUDA tensors"),
])
def test_errors(bad, message):
    args = dict(hidden=torch.randn(10, 8), weight=torch.randn(50, 8),
                targets=torch.zeros(10, dtype=torch.long), temperature=1.0, backend="auto")
    args.update(bad)
    if args["backend"] == "triton":
        pytest.importorskip("triton")
    with pytest.raises(ValueError, match=message):
        fused_logprobs(args.pop("hidden"), args.pop("weight"), args.pop("targets"), **args)
