"""Run the Triton kernels under TRITON_INTERPRET=1 on CPU tensors against the fp64 naive path.

Started in a subprocess by test_logprob_triton.py: TRITON_INTERPRET must be set before triton is
imported, and must not leak into other tests. fp32 only (the interpreter's bf16 dot is broken).
Every case runs with pointer loads and with TMA descriptor loads (where the shapes allow TMA).
"""

import os
import sys

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"

import torch  # noqa: E402

from ovr_hpc.kernels import logprob_triton  # noqa: E402
from ovr_hpc.kernels.logprob import _TorchBackend  # noqa: E402
from tests.kernels._cases import check_against_reference, make_inputs  # noqa: E402

TOL = {"logp": 1e-4, "entropy": 1e-4, "grad_hidden": 1e-4, "grad_weight": 1e-4}

# (T, H, V, peaked, temperature, entropy, ignore_every): H=67 takes the masked-K path (and is no
# TMA shape: 268-byte rows), H=64 the even one, H=68 TMA's zero-filled K edge; V=1013 leaves a
# partial last tile and, with 128-column backward chunks, a partial chunk; T=37 a partial row block.
CASES = [
    (37, 67, 1013, False, 1.0, False, 0),
    (37, 67, 1013, True, 0.7, True, 5),
    (70, 64, 1013, True, 1.5, True, 3),
    (37, 68, 1013, True, 0.7, True, 4),
    (5, 64, 300, False, 1.0, True, 0),
]


def main():
    failures = 0
    for use_tma in (False, True):
        logprob_triton.USE_TMA = use_tma
        for t, h, v, peaked, temp, ent, ign in CASES:
            case = (t, h, v, peaked, temp, ent, ign)
            hidden, weight, targets = make_inputs(t, h, v, peaked=peaked, ignore_every=ign, seed=t + v)
            loads = "tma" if logprob_triton._tma_usable(hidden, weight) else "pointer"
            if use_tma and loads != ("tma" if h % 4 == 0 else "pointer"):
                failures += 1
                print("FAIL", case, "TMA asked for: expected", "tma" if h % 4 == 0 else "pointer",
                      "loads, got", loads)
            try:
                errs = check_against_reference(hidden, weight, targets, temp, ent, tol=TOL,
                                               backend="triton")
                print("ok", loads, case, errs)
            except AssertionError as exc:
                failures += 1
                print("FAIL", loads, case, exc)
        # TMA and pointer loads compute the same tiles in the same order.
        if use_tma:
            hidden, weight, targets = make_inputs(70, 64, 1013, peaked=True, seed=11)
            stats = []
            for flag in (False, True):
                logprob_triton.USE_TMA = flag
                stats.append(logprob_triton.partial_stats(hidden, weight, targets, 0.7, True))
            same = all(torch.equal(x, y) for x, y in zip(*stats))
            print("ok" if same else "FAIL", "TMA forward statistics equal the pointer kernel's")
            failures += not same

    # Tensor-parallel shards hand the kernel local target ids outside [0, V): negative, and just
    # past V (inside the padding of the last tile). They must match no column.
    local = torch.tensor([-5, 0, 1012, 1013, 1015, 2000, 3] + [7] * 30)
    for h_size, ent in ((67, False), (67, True), (68, True)):      # H=68 with TMA loads
        hidden, weight, _ = make_inputs(37, h_size, 1013, peaked=True)
        got = logprob_triton.partial_stats(hidden, weight, local, 0.7, ent)
        want = _TorchBackend.partial_stats(hidden, weight, local, 0.7, ent)
        # The two backends split the vocabulary differently; compare the merged quantities.
        lse_got, lse_want = got[0] + got[1].log(), want[0] + want[1].log()
        ok = torch.allclose(lse_got, lse_want, atol=1e-4) and torch.allclose(got[3], want[3], atol=1e-4)
        if ent:
            ok = ok and torch.allclose(got[2] / got[1] + got[0], want[2] / want[1] + want[0], atol=1e-4)
        print("ok" if ok else "FAIL", "out-of-shard targets, H", h_size, "entropy", ent)
        failures += not ok
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
