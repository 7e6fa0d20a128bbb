#!/usr/bin/env python
"""Regenerate the learning tests' golden curves (tests/assets/golden/) -- only on purpose.

    python scripts/update-golden-curves.py coldstart   # the cold-start loss curve (~2 min)
    python scripts/update-golden-curves.py rl          # the RL reward curve (~2 min)
    python scripts/update-golden-curves.py rl-start    # the RL test's start model: the demo's cold start,
                                                       # seed 0, 2 local ranks (~4 min); then run `rl`

A change that moves a curve on purpose (new data, a different loss) regenerates it here and says why in its
commit; tests/learning/test_learning.py otherwise holds every change to these curves within its tolerance.
Run it with the pinned versions (constraints.txt), as CI does.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.learning import setups  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["coldstart", "rl", "rl-start"])
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="golden-")
    try:
        if args.what == "coldstart":
            result = setups.run_coldstart(work)
            print(setups.write_golden("coldstart", {"loss": result["losses"]},
                                      f"tests.learning.setups.run_coldstart: {setups.COLDSTART_STEPS} steps"))
            print(f"held-out arithmetic accuracy {result['heldout']['accuracy']:.3f}")
        elif args.what == "rl":
            result = setups.run_rl(work)
            print(setups.write_golden("rl", {"reward": result["rewards"]},
                                      f"tests.learning.setups.run_rl: {setups.RL_STEPS} steps from rl_start_model"))
            print(f"held-out colour accuracy {result['before']['accuracy']:.3f} -> {result['after']['accuracy']:.3f}")
        else:
            from ovr_hpc.demo import DEMO_MODEL, run_coldstart
            from ovr_hpc.models.tiny import build_tiny_model

            model = build_tiny_model(os.path.join(work, "tiny_model"), seed=0, **DEMO_MODEL)
            exported = run_coldstart(work, str(model), nprocs=2, seed=0)["model"]
            shutil.rmtree(setups.RL_START_MODEL, ignore_errors=True)
            shutil.copytree(exported, setups.RL_START_MODEL)
            print(f"wrote {setups.RL_START_MODEL}; now run: {sys.argv[0]} rl")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
