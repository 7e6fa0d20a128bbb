"""Megatron-core tensor/pipeline-parallel engine (issue 8).

So far: the HF <-> megatron-core conversion (`convert`, plain torch) and the layout rules (`layout`, no
torch: `ovr_hpc.config` may import it), both free of megatron imports. The engine itself (GPTModel with
mrope, the HF vision tower on the first stage, distributed checkpointing) comes later and will be the only
module that imports megatron.core. Nothing is imported here, so importing `layout` stays torch-free.
"""
