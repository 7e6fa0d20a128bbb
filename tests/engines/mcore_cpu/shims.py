"""TEST-ONLY shims that let megatron-core 0.16 run on CPU processes with gloo.

megatron-core calls a few CUDA functions unconditionally (measured on these machines, see issue 8):
the current device when it allocates buffers, a synchronize, the model-parallel RNG tracker (which
seeds and forks CUDA generators, and whose CUDA state activation recompute saves and restores), and one
``device="cuda"`` token counter in the pipeline schedules.
Each shim below replaces exactly one of them with its CPU meaning. They live here, in the test fixtures,
never in the package: on a GPU the package runs megatron-core unmodified.
"""

from __future__ import annotations

import contextlib
import functools

_installed = False


def install() -> None:
    global _installed
    if _installed:
        return
    _installed = True
    import torch

    # 1. "the current device": megatron allocates rotary frequencies, p2p buffers etc. on it
    torch.cuda.current_device = lambda: "cpu"
    # 2. synchronize calls around communication and timers
    torch.cuda.synchronize = lambda *a, **k: None

    # 3. the model-parallel RNG tracker forks CUDA generators around dropout (we run without dropout)
    from megatron.core.tensor_parallel import random as mp_random

    class CpuRngTracker(mp_random.CudaRNGStatesTracker):
        def add(self, name, seed):
            self.states_[name] = seed

        @contextlib.contextmanager
        def fork(self, name=mp_random._MODEL_PARALLEL_RNG_TRACKER_NAME):
            yield

    tracker = CpuRngTracker()
    mp_random._CUDA_RNG_STATE_TRACKER = tracker
    mp_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    mp_random.get_cuda_rng_tracker = lambda *a, **k: tracker
    mp_random.model_parallel_cuda_manual_seed = lambda *a, **k: None
    # ...and activation recompute saves / restores the CUDA generator's state around each layer
    mp_random._get_cuda_rng_state = lambda *a, **k: None
    mp_random._set_cuda_rng_state = lambda *a, **k: None

    # 4. the schedules count tokens in a device="cuda" tensor
    from megatron.core.pipeline_parallel import schedules

    class _TorchOnCpu:
        def __getattr__(self, name):
            return getattr(torch, name)

        @staticmethod
        def zeros(*args, **kwargs):
            if str(kwargs.get("device", "")).startswith("cuda"):
                kwargs["device"] = "cpu"
            return torch.zeros(*args, **kwargs)

    schedules.torch = _TorchOnCpu()
