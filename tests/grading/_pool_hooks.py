"""Score functions for RewardPool tests (importable by spawned workers)."""

import os
import signal
import time

from ovr_hpc.grading import score


def hooked_score(response, reference, *, answer_type=None, finished=True):
    """The real reward, except for a few magic responses that misbehave on purpose."""
    if response == "HANG":  # uninterruptible by the in-worker timer: only a kill ends it
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
        time.sleep(600)
    if response == "SLOW":  # interruptible: the in-worker timer ends it, worker survives
        time.sleep(600)
    if response == "CRASH":
        os._exit(3)
    return score(response, reference, answer_type=answer_type, finished=finished, timeout_s=None)
