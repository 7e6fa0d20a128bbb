"""The Triton kernels: under the interpreter on the CPU (always), on a GPU at full size (when present)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ._cases import check_against_reference, make_inputs

REPO = Path(__file__).resolve().parents[2]


def test_triton_kernels_under_interpreter():
    triton = pytest.importorskip("triton")
    if tuple(int(x) for x in triton.__version__.split(".")[:2]) < (3, 7):
        # Seen with triton 3.6 + numpy 2.5: its interpreter passes scalar kernel arguments as
        # 1-element arrays, and range() over one fails ("only 0-dimensional arrays can be
        # converted to Python scalars"). The compiled kernels are unaffected.
        pytest.skip("the triton < 3.7 interpreter cannot loop over a runtime bound")
    # Small backward chunks so several chunks (and a partial last one) are exercised.
    env = dict(os.environ, TRITON_INTERPRET="1", OVR_LOGPROB_DZ_CHUNK_COLS="128")
    proc = subprocess.run([sys.executable, "-m", "tests.kernels._triton_interpret_check"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_importing_triton_module_does_not_need_cuda():
    from ovr_hpc.kernels import logprob_triton
    assert logprob_triton.available() == (logprob_triton.triton is not None and torch.cuda.is_available())


needs_gpu = pytest.mark.skipif(
    not torch.cuda.is_available() or not __import__("ovr_hpc.kernels.logprob_triton",
                                                    fromlist=["available"]).available(),
    reason="needs a CUDA GPU with triton")

GPU_TOL_FP32 = {"logp": 1e-3, "entropy": 1e-3, "grad_hidden": 1e-4, "grad_weight": 1e-4}
GPU_TOL_BF16 = {"logp": 5e-2, "entropy": 5e-2, "grad_hidden": 1e-2, "grad_weight": 1e-2}


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_entropy", [False, True])
def test_triton_odd_shapes_on_gpu(dtype, with_entropy):
    hidden, weight, targets = make_inputs(251, 67, 1013, dtype=dtype, peaked=True, ignore_every=5,
                                          device="cuda")
    tol = GPU_TOL_FP32 if dtype == torch.float32 else GPU_TOL_BF16
    check_against_reference(hidden, weight, targets, 0.7, with_entropy, tol=tol, backend="triton")


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_tma_loads_on_gpu(dtype, monkeypatch):
    # H=72: 16-byte aligned rows in both dtypes, a K edge for both BLOCK_K; T and V leave partial tiles.
    from ovr_hpc.kernels import logprob_triton
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA needs compute capability >= 9")
    monkeypatch.setattr(logprob_triton, "USE_TMA", True)
    hidden, weight, targets = make_inputs(251, 72, 1013, dtype=dtype, peaked=True, ignore_every=5,
                                          device="cuda")
    assert logprob_triton._tma_usable(hidden, weight)
    tol = GPU_TOL_FP32 if dtype == torch.float32 else GPU_TOL_BF16
    check_against_reference(hidden, weight, targets, 0.7, True, tol=tol, backend="triton")


@needs_gpu
@pytest.mark.slow
def test_triton_qwen_size_on_gpu():
    # Qwen2.5-VL-7B's LM head; the reference runs on the GPU in fp32 here (fp64 would be slow).
    from ovr_hpc.kernels import fused_logprobs, logprobs_reference
    hidden, weight, targets = make_inputs(4096, 3584, 152064, dtype=torch.bfloat16, peaked=True,
                                          ignore_every=9, device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(3)
    g1 = torch.randn(4096, device="cuda", generator=gen)
    g2 = torch.randn(4096, device="cuda", generator=gen)
    results = []
    for fn, up in ((fused_logprobs, False), (logprobs_reference, True)):
        h = (hidden.float() if up else hidden).clone().requires_grad_()
        w = (weight.float() if up else weight).clone().requires_grad_()
        kw = {"backend": "triton"} if fn is fused_logprobs else {}
        logp, ent = fn(h, w, targets, temperature=0.9, return_entropy=True, **kw)
        ((logp * g1).sum() + (ent * g2).sum()).backward()
        results.append((logp.detach(), ent.detach(), h.grad.float(), w.grad.float()))
        del h, w, logp, ent
    (lp, en, gh, gw), (rlp, ren, rgh, rgw) = results
    assert (lp <= 0).all()
    assert (lp - rlp).abs().max() < 5e-2 and (en - ren).abs().max() < 5e-2
    assert (gh - rgh).norm() / rgh.norm() < 1e-2 and (gw - rgw).norm() / rgw.norm() < 1e-2
