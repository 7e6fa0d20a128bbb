"""The sizes of the released Qwen2.5-VL checkpoints (their config.json), for what is planned or checked
before a model is on this machine: `ovr_hpc.preflight` checks TP against heads and PP against layers for a
hub id that is not in the local cache, `ovr_hpc.plan` counts parameters, bytes and FLOPs. No imports.

Text entries are the language model's (config.json's top level / text_config); `vision_config` is the vision
tower's: the same 32-block ViT in every size, its merger projecting to the text hidden size.
"""

from __future__ import annotations


def _vision(out_hidden_size: int, intermediate_size: int) -> dict:
    return dict(depth=32, hidden_size=1280, intermediate_size=intermediate_size, num_heads=16, patch_size=14,
                temporal_patch_size=2, spatial_merge_size=2, in_channels=3, out_hidden_size=out_hidden_size)


# vision intermediate_size: 3420 in the 3B / 7B config.json; 3456 for 32B / 72B as other ports of those
# configs give it (not read from the hub here: 4.4 M parameters either way, under 0.01% of the model).
KNOWN_ARCHITECTURES: dict[str, dict] = {
    "Qwen/Qwen2.5-VL-3B-Instruct": dict(hidden_size=2048, num_hidden_layers=36, num_attention_heads=16,
                                        num_key_value_heads=2, intermediate_size=11008, vocab_size=151936,
                                        tie_word_embeddings=True, vision_config=_vision(2048, 3420)),
    "Qwen/Qwen2.5-VL-7B-Instruct": dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28,
                                        num_key_value_heads=4, intermediate_size=18944, vocab_size=152064,
                                        vision_config=_vision(3584, 3420)),
    "Qwen/Qwen2.5-VL-32B-Instruct": dict(hidden_size=5120, num_hidden_layers=64, num_attention_heads=40,
                                         num_key_value_heads=8, intermediate_size=27648, vocab_size=152064,
                                         vision_config=_vision(5120, 3456)),
    "Qwen/Qwen2.5-VL-72B-Instruct": dict(hidden_size=8192, num_hidden_layers=80, num_attention_heads=64,
                                         num_key_value_heads=8, intermediate_size=29568, vocab_size=152064,
                                         vision_config=_vision(8192, 3456)),
}
