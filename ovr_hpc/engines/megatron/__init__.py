"""Megatron-core tensor/pipeline-parallel engine (issue 8).

    layout.py     the layout rules (no torch: `ovr_hpc.preflight` may import it)
    convert.py    HF <-> megatron-core parameter conversion, plain torch
    model.py      the GPTModel stages with mrope and the HF vision tower on the first stage
    optimizer.py  ShardedAdamW: AdamW with its states sharded over data-parallel ranks (ZeRO-1)
    engine.py     MegatronEngine: the engine surface of `ovr_hpc.engines.base` (schedule, checkpoints)

Only model.py, optimizer.py and engine.py use megatron-core. Nothing is imported here, so importing
`layout` stays torch-free.
"""
