"""Test-only support for running megatron-core on CPU processes (see shims.py)."""
