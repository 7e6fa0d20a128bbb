"""Preparing data once per job, split over the ranks: what the cold-start dataset and the RL prompts share.

Each rank prepares every W-th record into its own shard inside a folder named by `cache_key` (the data
files' paths, sizes and modification times, and the settings that shape the result), then every rank
reads all shards. A requeued job, or another run on the same data and settings, finds them and prepares
nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import time

SHARD_WAIT_S = 600   # shared filesystems can show another rank's file well after the barrier


def cache_key(files: list[str], settings: list) -> str:
    h = hashlib.sha256()
    for path in files:
        st = os.stat(path)
        h.update(f"{os.path.abspath(path)}:{st.st_size}:{st.st_mtime_ns}".encode())
    h.update(json.dumps(settings).encode())
    return h.hexdigest()[:16]


def wait_for_file(path: str, timeout_s: float = SHARD_WAIT_S) -> None:
    """Until `path`, written by another rank before a barrier, is visible here."""
    deadline = time.time() + timeout_s
    while not os.path.exists(path):
        if time.time() > deadline:
            raise TimeoutError(f"{path} (another rank's share of the data) did not appear within {timeout_s:.0f} s; "
                               "the data cache must be on a filesystem every node sees")
        time.sleep(1)
