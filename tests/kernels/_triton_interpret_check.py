"""Run the Triton kernels under TRITON_INTERPRET=1 on CPU tensors against the fp64 naive path.

Started in a subprocess by test_logprob_triton.py: TRITON_INTERPRET must be set before triton is
imported, and must not leak into other tests. fp32 only (the interpreter's bf16 dot is broken).
"""

import os
import sys

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"

import torch  # noqa: E402

from ovr_hpc.kernels import logprob_triton  # noqa: E402
from ovr_hpc.kernels.logprob import _TorchBackend  # noqa: E402
from tests.kernels._cases import check_against_reference, make_inputs  # noqa: E402

TOL = {"logp": 1e-4, "entropy": 1e-4, "grad_hidden": 1e-4, "grad_weight": 1e-4}

# (T, H, V, peaked, temperature, entropy, ignore_every): H=67 takes the masked-K path, H=64 the
# even one; V=1013 leaves a partial last tile and, with 128-column backward chunks, a partial chunk.
CASES = [
    (37, 67, 1013, False, 1.0, False, 0),
    (37, 67, 1013, True, 0.7, True, 5),
    (70, 64, 1013, True, 1.5, True, 3),
    (5, 64, 300, False, 1.0, True, 0),
]


def main():
    failures = 0
    for t, h, v, peaked, temp, ent, ign in CASES:
        hidden, weight, targets = make_inputs(t, h, v, peaked=peaked, ignore_every=ign, seed=t + v)
        try:
            errs = check_against_reference(hidden, weight, targets, temp, ent, tol=TOL,
                                           backend="triton")
            print("ok", (t, h, v, peaked, temp, ent, ign), errs)
        except AssertionError as exc:
            failures += 1
            print("FAIL", (t, h, v, peaked, temp, ent, ign), exc)

    # Tensor-parallel shards hand the kernel local target ids outside [0, V): negative, and just
    # past V (inside the padding of the last tile). They must match no column.
    hidden, weight, _ = make_inputs(37, 67, 1013, peaked=True)
    local = torch.tensor([-5, 0, 1012, 1013, 1015, 2000, 3] + [7] * 30)
    for ent in (False, True):
        got = logprob_triton.partial_stats(hidden, weight, local, 0.7, ent)
        want = _TorchBackend.partial_stats(hidden, weight, local, 0.7, ent)
        # The two backends split the vocabulary differently; compare the merged quantities.
        lse_got, lse_want = got[0] + got[1].log(), want[0] + want[1].log()
        ok = torch.allclose(lse_got, lse_want, atol=1e-4) and torch.allclose(got[3], want[3], atol=1e-4)
        if ent:
            ok = ok and torch.allclose(got[2] / got[1] + got[0], want[2] / want[1] + want[0], atol=1e-4)
        print("ok" if ok else "FAIL", "out-of-shard targets, entropy", ent)
        failures += not ok
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
