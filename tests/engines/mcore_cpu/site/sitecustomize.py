"""TEST-ONLY: put this directory on PYTHONPATH with OVR_TEST_MCORE_CPU_SHIMS=1 and every Python process
started by a test (the ranks of `ovr-hpc coldstart` / `rl`) installs the megatron-core CPU shims of
tests/engines/mcore_cpu/shims.py before anything else runs."""

import os

if os.environ.get("OVR_TEST_MCORE_CPU_SHIMS") == "1":
    import importlib.util

    _path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "shims.py")
    _spec = importlib.util.spec_from_file_location("ovr_test_mcore_cpu_shims", _path)
    _shims = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_shims)
    _shims.install()
