"""Benchmark: per-token log-probs of the LM head, forward + backward, time and peak extra memory.

    python bench/logprob.py                 # CPU case (T=8192, H=256, V=32768 fp32)
    python bench/logprob.py --gpu           # GPU cases (T in 8k/32k/64k, H=3584, V=152064 bf16)
    python bench/logprob.py --gpu --tune    # time a few Triton tile shapes first

Every method computes loss = mean(-log p(target)) and its gradients with respect to hidden and weight.
"Extra" memory is the peak above what was allocated before the call (the inputs), minus the two
gradients every method must return (T*H + V*H elements): the temporaries a method needs.

CPU memory: torch's CPU allocator is invisible to tracemalloc, so each method runs in its own fresh
process with glibc's mmap threshold pinned (MALLOC_MMAP_THRESHOLD_): every large tensor is then its
own mmap, returned to the OS when freed, so the resident set size follows live memory; a thread
samples /proc/self/statm every 0.2 ms during a warm run and the peak above the pre-run RSS is kept.
(Peaks shorter than the sampling period could be missed; the [rows, V] chunks and [T, V] logits that
make up these peaks live for milliseconds to seconds.)
GPU memory: torch.cuda.max_memory_allocated around one warm run.
Time: median of several warm runs (CUDA events / wall clock after synchronisation).
"""

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ovr_hpc.kernels import fused_logprobs, logprobs_reference  # noqa: E402

CPU_CASES = [dict(T=8192, H=256, V=32768, dtype="float32")]
GPU_CASES = [dict(T=t, H=3584, V=152064, dtype="bfloat16") for t in (8192, 32768, 65536)]


# ----------------------------------------------------------------------------------------------
# Methods: each returns a function running forward + backward once
# ----------------------------------------------------------------------------------------------
def _naive_loss(h, w, t):
    return -logprobs_reference(h, w, t)[0].mean()


_DEFAULT_CHUNK = int(os.environ.get("OVR_LOGPROB_DZ_CHUNK_COLS", 4096))
_compiled_naive = torch.compile(_naive_loss)   # one compilation per new shape, reused across cases


def build_method(name, h, w, t):
    if name == "naive":
        return lambda: _naive_loss(h, w, t)
    if name == "compile":
        return lambda: _compiled_naive(h, w, t)
    if name.startswith("ours-torch"):
        return lambda: -fused_logprobs(h, w, t, backend="torch")[0].mean()
    if name.startswith("ours-triton"):
        from ovr_hpc.kernels import logprob_triton
        # e.g. ours-triton-c8192: that many backward chunk columns; otherwise the module's default
        # ours-triton-tma: tile loads through TMA descriptors
        chunk = int(name.split("-c")[1].split("+")[0]) if "-c" in name else _DEFAULT_CHUNK
        logprob_triton.DZ_CHUNK_COLS = chunk
        logprob_triton.USE_TMA = "-tma" in name
        ent = name.endswith("+entropy")

        def run():
            logp, entropy = fused_logprobs(h, w, t, backend="triton", return_entropy=ent)
            return -logp.mean() + (entropy.mean() * 0.01 if ent else 0)
        return run
    if name == "liger":
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
        return lambda: liger_fused_linear_cross_entropy(h, w, t)
    if name == "cce":
        from cut_cross_entropy import linear_cross_entropy
        return lambda: linear_cross_entropy(h, w, t)
    raise ValueError(name)


def make_inputs(T, H, V, dtype, device):
    gen = torch.Generator(device=device).manual_seed(0)
    dt = getattr(torch, dtype)
    h = torch.randn(T, H, generator=gen, device=device, dtype=torch.float32).to(dt).requires_grad_()
    w = (torch.randn(V, H, generator=gen, device=device, dtype=torch.float32) / math.sqrt(H)) \
        .to(dt).requires_grad_()
    t = torch.randint(0, V, (T,), generator=gen, device=device)
    return h, w, t


def step(fn, h, w):
    h.grad = w.grad = None
    fn().backward()


# ----------------------------------------------------------------------------------------------
# CPU: one process per method (see the module doc for the memory measurement)
# ----------------------------------------------------------------------------------------------
def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class RssPeak:
    def __init__(self, period_s=2e-4):
        self.period_s, self.peak, self._stop = period_s, 0, threading.Event()

    def __enter__(self):
        self.base = self.peak = _rss_bytes()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(self.period_s)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())


def cpu_worker(method, case, reps, what):
    h, w, t = make_inputs(case["T"], case["H"], case["V"], case["dtype"], "cpu")
    fn = build_method(method, h, w, t)
    step(fn, h, w)                                  # warm-up (and compilation)
    if what == "memory":
        h.grad = w.grad = None
        with RssPeak() as mem:
            step(fn, h, w)
        grads = (h.numel() + w.numel()) * h.element_size()
        return dict(peak_extra=mem.peak - mem.base - grads)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step(fn, h, w)
        times.append(time.perf_counter() - t0)
    return dict(time_s=statistics.median(times))


def run_cpu(args):
    methods = args.methods or ["naive", "compile", "ours-torch"]
    for case in CPU_CASES:
        results = {}
        for method in methods:
            results[method] = dict(method=method)
            # Memory with the mmap threshold pinned (see the module doc); time in a process with
            # glibc's defaults, so pinning cannot slow any method down.
            for what, env in (("memory", dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")),
                              ("time", dict(os.environ))):
                cmd = [sys.executable, __file__, "--cpu-worker", method, "--measure", what,
                       "--case", json.dumps(case), "--reps", str(args.reps)]
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
                if proc.returncode != 0:
                    results[method] = dict(method=method, skipped=f"failed: {proc.stderr[-1500:]}")
                    break
                results[method].update(json.loads(proc.stdout.strip().splitlines()[-1]))
            print("   ", json.dumps(results[method]), flush=True)
        report(case, results, note="CPU, %d threads" % torch.get_num_threads())
    print("liger, cce: skipped on the CPU (their kernels are Triton GPU kernels); ours-triton: GPU only")


# ----------------------------------------------------------------------------------------------
# GPU
# ----------------------------------------------------------------------------------------------
def cuda_time(fn, reps, warmup=1):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def bare_matmuls(case, reps):
    """The three GEMMs any method must do (logits, grad_hidden, grad_weight), with cuBLAS."""
    h, w, _ = make_inputs(case["T"], case["H"], case["V"], case["dtype"], "cuda")
    h, w = h.detach(), w.detach()
    logits = torch.empty(case["T"], case["V"], dtype=h.dtype, device="cuda")

    def three():
        torch.mm(h, w.T, out=logits)
        torch.mm(logits, w)          # the logits stand in for their gradient: same shape, real data
        torch.mm(logits.T, h)
    t = cuda_time(three, reps)
    del logits
    return t


def gpu_method(method, case, reps):
    h, w, t = make_inputs(case["T"], case["H"], case["V"], case["dtype"], "cuda")
    try:
        fn = build_method(method, h, w, t)
    except ImportError as exc:
        return dict(method=method, skipped=f"not importable: {exc}")
    try:
        step(fn, h, w)                              # warm-up, compilation
        h.grad = w.grad = None
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step(fn, h, w)
        torch.cuda.synchronize()
        grads = (h.numel() + w.numel()) * h.element_size()
        peak_extra = torch.cuda.max_memory_allocated() - base - grads
        time_s = cuda_time(lambda: step(fn, h, w), reps, warmup=0)
        return dict(method=method, time_s=time_s, peak_extra=peak_extra)
    except torch.OutOfMemoryError:
        return dict(method=method, skipped="out of GPU memory")
    finally:
        del h, w, t
        torch.cuda.empty_cache()


def run_gpu(args):
    methods = args.methods or ["naive", "compile", "ours-torch", "ours-triton", "ours-triton-tma",
                               "ours-triton-c8192", "ours-triton+entropy", "liger", "cce"]
    name = torch.cuda.get_device_name()
    for case in GPU_CASES:
        if args.T and case["T"] not in args.T:
            continue
        results = {}
        for method in methods:
            if method == "compile" and args.no_compile:
                continue
            if method == "ours-torch" and case["T"] > 8192 and not args.methods:
                continue      # the GPU fallback: measured at the smallest case only (it is slow)
            results[method] = gpu_method(method, case, args.reps)
            print("   ", json.dumps(results[method]), flush=True)
        results["bare-3-gemms"] = dict(method="bare-3-gemms", time_s=bare_matmuls(case, args.reps),
                                       peak_extra=float("nan"))
        report(case, results, note=name)


def tune(args):
    """Time the forward and backward of the Triton backend for a few tile shapes at T=8k."""
    from ovr_hpc.kernels import logprob_triton as lt
    case = GPU_CASES[0]
    h, w, t = make_inputs(case["T"], case["H"], case["V"], case["dtype"], "cuda")
    base = dict(BLOCK_T=128, BLOCK_V=256, BLOCK_K=64, GROUP_T=8, num_warps=8, num_stages=3)
    configs = [  # (TMA loads, tiles); the first is the default
        (False, base),
        (False, dict(base, GROUP_T=4)),
        (False, dict(base, GROUP_T=16)),
        (False, dict(base, num_stages=4)),
        (True, base),
        (True, dict(base, num_stages=4)),
        (True, dict(base, BLOCK_K=128, num_stages=2)),
        (True, dict(base, BLOCK_V=128, num_warps=4, num_stages=4)),
        (False, base),                                   # the default again: noise
    ]
    gemm = cuda_time(lambda: torch.mm(h.detach(), w.detach().T), 5)
    print(f"tune: one [T,H]x[H,V] cuBLAS GEMM {gemm * 1e3:.2f} ms")
    for use_tma, cfg in configs:
        lt.GPU_CONFIG, lt.USE_TMA = cfg, use_tma
        try:
            fwd = cuda_time(lambda: fused_logprobs(h.detach(), w.detach(), t, backend="triton"), 5)
            tot = cuda_time(lambda: step(lambda: -fused_logprobs(h, w, t, backend="triton")[0].mean(),
                                         h, w), 5)
            print(f"tune: tma={use_tma} {cfg} fwd {fwd * 1e3:.2f} ms ({fwd / gemm:.2f}x gemm) "
                  f"fwd+bwd {tot * 1e3:.2f} ms ({tot / gemm:.2f}x gemm)", flush=True)
        except Exception as exc:  # noqa: BLE001 - a shape that does not compile is a result too
            print(f"tune: tma={use_tma} {cfg} failed: {type(exc).__name__}: {str(exc)[:200]}")


# ----------------------------------------------------------------------------------------------
def report(case, results, note):
    T, V = case["T"], case["V"]
    logits_bytes = T * V * torch.tensor([], dtype=getattr(torch, case["dtype"])).element_size()
    print(f"\n## T={T} H={case['H']} V={V} {case['dtype']} fwd+bwd ({note}); naive logits "
          f"{logits_bytes / 2**30:.2f} GiB")
    naive = results.get("naive", {})
    gemms = results.get("bare-3-gemms", {})
    print(f"{'method':<24}{'time ms':>10}{'extra MiB':>11}{'x naive t':>10}{'x 3 GEMMs':>10}"
          f"{'extra/logits':>13}")
    for m, r in results.items():
        if "skipped" in r:
            print(f"{m:<24}  skipped: {r['skipped']}")
            continue
        tn = f"{r['time_s'] / naive['time_s']:.2f}" if "time_s" in naive else "-"
        tg = f"{r['time_s'] / gemms['time_s']:.2f}" if "time_s" in gemms else "-"
        extra = r["peak_extra"]
        ex = "-" if extra != extra else f"{extra / 2**20:.0f}"
        el = "-" if extra != extra else f"{100 * extra / logits_bytes:.1f}%"
        print(f"{m:<24}{r['time_s'] * 1e3:>10.1f}{ex:>11}{tn:>10}{tg:>10}{el:>13}")
    if "time_s" in naive:
        for m in results:
            if m.startswith("ours") and "time_s" in results[m]:
                r = results[m]
                print(f"  {m}: time {r['time_s'] / naive['time_s']:.2f}x naive, extra memory "
                      f"{100 * r['peak_extra'] / max(naive['peak_extra'], 1):.1f}% of naive's")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--gpu", action="store_true")
    p.add_argument("--tune", action="store_true")
    p.add_argument("--methods", nargs="*")
    p.add_argument("--T", type=int, nargs="*", help="GPU cases to run (default all)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--cpu-worker")
    p.add_argument("--case")
    p.add_argument("--measure", choices=["memory", "time"])
    args = p.parse_args()
    if args.cpu_worker:
        print(json.dumps(cpu_worker(args.cpu_worker, json.loads(args.case), args.reps, args.measure)))
    elif args.tune:
        tune(args)
    elif args.gpu:
        run_gpu(args)
    else:
        run_cpu(args)


if __name__ == "__main__":
    main()
