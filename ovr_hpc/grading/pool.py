"""The reward in worker processes: a batch scored in parallel, each item under a hard time bound (a worker
that hangs is killed and replaced), each worker's memory capped."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import threading
import time
from collections import deque
from multiprocessing.connection import wait as _mp_wait
from typing import Any, Callable, Iterable, Sequence

from ovr_hpc.grading.answer import RewardResult, call_with_time_limit, result_of, score
from ovr_hpc.grading.text import MAX_RESPONSE_CHARS

# ----------------------------------------------------------------------------- worker pool
Item = Any  # (response, reference[, answer_type[, finished]]) or a dict with those keys


def _unpack(item: Item) -> tuple[Any, Any, str | None, bool]:
    if isinstance(item, dict):
        return (
            item.get("response"),
            item.get("reference"),
            item.get("answer_type"),
            bool(item.get("finished", True)),
        )
    item = tuple(item)
    response, reference = item[0], item[1]
    answer_type = item[2] if len(item) > 2 else None
    finished = bool(item[3]) if len(item) > 3 else True
    return response, reference, answer_type, finished


def _score_item(score_fn: Callable[..., RewardResult], item: Item, timeout_s: float | None) -> RewardResult:
    response, reference, answer_type, finished = _unpack(item)
    if score_fn is score:
        return score(response, reference, answer_type=answer_type, finished=finished, timeout_s=timeout_s)
    try:
        return call_with_time_limit(
            lambda: score_fn(response, reference, answer_type=answer_type, finished=finished),
            timeout_s,
        )
    except Exception:
        return result_of("error")


def _set_memory_limit(extra_mb: int | None) -> None:
    if not extra_mb:
        return
    try:
        import resource

        with open("/proc/self/statm") as f:
            current = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        limit = current + int(extra_mb) * (1 << 20)
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        if hard != resource.RLIM_INFINITY:
            limit = min(limit, hard)
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    except Exception:  # not Linux / not permitted: run without a memory cap
        pass


def _worker_main(conn, score_fn, soft_timeout_s, max_memory_mb) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the trainer, which closes us
    _set_memory_limit(max_memory_mb)
    # Import sympy/antlr and warm the caches before "ready" (also for a custom score_fn, which
    # usually wraps ``score``), so that no item's time limit pays the ~1 s import.
    score("\\boxed{\\frac{1}{2}}", "0.5", timeout_s=None)
    conn.send(("ready", os.getpid()))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        idx, item = msg
        try:
            res = _score_item(score_fn, item, soft_timeout_s)
        except BaseException:  # noqa: BLE001 - a worker must answer
            res = result_of("error")
        if not isinstance(res, RewardResult):
            res = result_of("error")
        try:
            conn.send((idx, res))
        except (BrokenPipeError, OSError):
            return


class _Worker:
    __slots__ = ("proc", "conn", "ready", "idx", "deadline", "born")

    def __init__(self, proc, conn):
        self.proc = proc
        self.conn = conn
        self.ready = False
        self.idx: int | None = None
        self.deadline = 0.0
        self.born = time.monotonic()


class RewardPool:
    """Score reward items in ``num_workers`` worker processes.

    ``score_batch(items)`` returns one :class:`RewardResult` per item, in input order.  An item
    not answered within ``timeout_s`` seconds of being handed to a worker scores 0 with reason
    "timeout"; that worker is SIGKILLed and a fresh one started (asynchronously: the batch goes
    on with the others).  Inside each worker ``score`` also runs under a SIGALRM timer of
    ``soft_timeout_s`` (default ``0.6 * timeout_s``) which usually ends a slow item without a
    kill.  A worker that dies scores its item "crashed" and is replaced.  Each worker's address
    space is capped at its size after start-up + ``max_memory_mb`` (MemoryError -> "error").

    ``mp_context``: "spawn" (default) or "forkserver" — never fork: the trainer has threads and
    CUDA.  With spawn each worker re-imports the trainer's ``__main__`` module (standard
    multiprocessing behaviour), then sympy/math-verify: start-up is about 1-3 s per worker, paid
    once in ``__init__`` (which waits until all are ready unless ``wait_ready=False``) and again
    for each replacement.  ``num_workers=0`` scores in the calling process (tests, debugging),
    with the SIGALRM bound only if that is the main thread.

    One ``score_batch`` at a time (a lock serialises calls); it may run in a background thread
    of the trainer.  ``score_fn`` (a picklable top-level function with ``score``'s signature,
    minus ``timeout_s``) replaces the reward, e.g. for other tasks or tests.
    """

    def __init__(
        self,
        num_workers: int,
        timeout_s: float = 10.0,
        *,
        soft_timeout_s: float | None = -1.0,
        max_memory_mb: int | None = 2048,
        mp_context: str = "spawn",
        score_fn: Callable[..., RewardResult] | None = None,
        wait_ready: bool = True,
        start_timeout_s: float = 120.0,
    ):
        if num_workers < 0:
            raise ValueError("num_workers must be >= 0")
        if timeout_s <= 0:
            raise ValueError("timeout_s must be > 0")
        if mp_context not in ("spawn", "forkserver"):
            raise ValueError("mp_context must be 'spawn' or 'forkserver' (fork is unsafe here)")
        self.num_workers = num_workers
        self.timeout_s = float(timeout_s)
        self.soft_timeout_s = 0.6 * self.timeout_s if soft_timeout_s == -1.0 else soft_timeout_s
        self.max_memory_mb = max_memory_mb
        self.start_timeout_s = start_timeout_s
        self.score_fn = score_fn or score
        self._ctx = mp.get_context(mp_context)
        self._lock = threading.Lock()
        self._workers: list[_Worker] = []
        self._closed = False
        self._start_failures = 0
        # counters for logging
        self.num_timeouts = 0
        self.num_crashes = 0
        self.num_restarts = 0
        for _ in range(num_workers):
            self._workers.append(self._spawn())
        if wait_ready and num_workers:
            try:
                self._wait_all_ready()
            except BaseException:
                self.close()
                raise

    # -- lifecycle
    def _spawn(self) -> _Worker:
        parent, child = self._ctx.Pipe(duplex=True)
        proc = self._ctx.Process(
            target=_worker_main,
            args=(child, self.score_fn, self.soft_timeout_s, self.max_memory_mb),
            daemon=True,
            name="ovr-reward-worker",
        )
        proc.start()
        child.close()
        return _Worker(proc, parent)

    def _kill(self, w: _Worker) -> None:
        try:
            if w.proc.is_alive():
                w.proc.kill()
            w.proc.join(timeout=5)
        except Exception:
            pass
        try:
            w.conn.close()
        except Exception:
            pass

    def _replace(self, w: _Worker) -> None:
        self._kill(w)
        i = self._workers.index(w)
        self._workers[i] = self._spawn()
        self.num_restarts += 1

    def _wait_all_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        while not all(w.ready for w in self._workers):
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError("reward workers did not start within %.0f s" % self.start_timeout_s)
            waiting = [w for w in self._workers if not w.ready]
            _mp_wait([w.conn for w in waiting] + [w.proc.sentinel for w in waiting], timeout=left)
            for w in waiting:
                self._poll_ready(w)

    def _poll_ready(self, w: _Worker) -> None:
        """Handle a not-yet-ready worker: consume its 'ready', or replace it if it died."""
        try:
            if w.conn.poll():
                msg = w.conn.recv()
                if isinstance(msg, tuple) and msg and msg[0] == "ready":
                    w.ready = True
                    self._start_failures = 0
                return
        except (EOFError, OSError):
            pass
        if not w.proc.is_alive() or time.monotonic() - w.born > self.start_timeout_s:
            self._start_failures += 1
            if self._start_failures > 3 * max(1, self.num_workers):
                raise RuntimeError(
                    "reward workers keep dying during start-up (exit code %s)" % w.proc.exitcode
                )
            self._replace(w)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for w in self._workers:
            try:
                w.conn.send(None)
            except Exception:
                pass
        deadline = time.monotonic() + 2.0
        for w in self._workers:
            w.proc.join(timeout=max(0.0, deadline - time.monotonic()))
            self._kill(w)
        self._workers = []

    def __enter__(self) -> "RewardPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass

    # -- scoring
    def score_batch(self, items: Sequence[Item] | Iterable[Item]) -> list[RewardResult]:
        items = list(items)
        if self._closed:
            raise RuntimeError("RewardPool is closed")
        if self.num_workers == 0:
            return [_score_item(self.score_fn, it, self.timeout_s) for it in items]
        with self._lock:
            return self._score_batch(items)

    def _prepare(self, item: Item) -> tuple:
        response, reference, answer_type, finished = _unpack(item)
        if isinstance(response, str) and len(response) > MAX_RESPONSE_CHARS:
            response = response[-MAX_RESPONSE_CHARS:]  # do not pickle 10 MB through a pipe
        if not finished:
            response = ""
        return (response, reference, answer_type, finished)

    def _score_batch(self, items: list) -> list[RewardResult]:
        n = len(items)
        results: list[RewardResult | None] = [None] * n
        pending = deque(range(n))
        done = 0
        while done < n:
            # hand out work
            for w in self._workers:
                if not pending:
                    break
                if w.ready and w.idx is None:
                    idx = pending.popleft()
                    try:
                        w.conn.send((idx, self._prepare(items[idx])))
                    except (BrokenPipeError, OSError, EOFError):
                        pending.appendleft(idx)
                        self._replace(w)
                        continue
                    except Exception:  # unpicklable item
                        results[idx] = result_of("error")
                        done += 1
                        continue
                    w.idx = idx
                    w.deadline = time.monotonic() + self.timeout_s
            if done >= n:
                break
            busy = [w for w in self._workers if w.idx is not None]
            starting = [w for w in self._workers if not w.ready]
            now = time.monotonic()
            wait_s = min([w.deadline - now for w in busy], default=1.0)
            wait_s = max(0.0, min(wait_s, 1.0))
            watched = busy + starting
            _mp_wait([w.conn for w in watched] + [w.proc.sentinel for w in watched], timeout=wait_s)
            for w in starting:
                self._poll_ready(w)
            now = time.monotonic()
            for w in busy:
                idx = w.idx
                got = None
                try:
                    if w.conn.poll():
                        msg = w.conn.recv()
                        if isinstance(msg, tuple) and len(msg) == 2 and msg[0] == idx:
                            got = msg[1]
                except (EOFError, OSError):
                    got = None
                    if results[idx] is None:
                        results[idx] = result_of("crashed")
                        self.num_crashes += 1
                        done += 1
                    w.idx = None
                    self._replace(w)
                    continue
                if got is not None:
                    results[idx] = got
                    done += 1
                    w.idx = None
                elif not w.proc.is_alive():
                    results[idx] = result_of("crashed")
                    self.num_crashes += 1
                    done += 1
                    w.idx = None
                    self._replace(w)
                elif now >= w.deadline:
                    results[idx] = result_of("timeout")
                    self.num_timeouts += 1
                    done += 1
                    w.idx = None
                    self._replace(w)
        return results  # type: ignore[return-value]
