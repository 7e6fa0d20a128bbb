"""Qwen2.5-VL on megatron-core: the language model as a `GPTModel` with multimodal rotary embeddings,
the Hugging Face vision tower kept as it is on the first pipeline stage.

One pipeline stage of the model is a `QwenVLStage`. Its forward takes the same packed micro-batch as the
DeepSpeed path (``MicroBatch.model_inputs()``: input ids [1, T], positions [4, 1, T] whose first row is
the text position that restarts at 0 for every packed sample, targets [T], pixel values and image grids)
and returns, on the last stage, fp32 log-probs (and entropy) through the fused kernel over the
vocab-parallel output layer (its ``tp_group`` path: no [T, V] logits, not even a [T, V / TP] slice of
them); on other stages, the hidden states for the next one.

Packed rows: several samples share a row and must not see each other. The local spec takes a
block-causal boolean mask ([1, 1, T, T], fine for the CPU tests and short rows); Transformer Engine gets
the sample boundaries as THD `PackedSeqParams` (cu_seqlens) instead, which is what long packed rows need.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .layout import PipelineSplit, TextDims, padded_vocab_size


def transformer_engine_available() -> bool:
    try:
        import transformer_engine  # noqa: F401

        return torch.cuda.is_available()
    except ImportError:
        return False


def text_config_of(hf_config: Any) -> Any:
    return hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config


def mrope_section_of(hf_config: Any) -> list[int]:
    text = text_config_of(hf_config)
    rope = getattr(text, "rope_parameters", None) or getattr(text, "rope_scaling", None) or {}
    section = rope.get("mrope_section")
    if not section:
        raise ValueError("the model config has no rope mrope_section: not a Qwen2.5-VL language model")
    return list(section)


def rope_theta_of(hf_config: Any) -> float:
    text = text_config_of(hf_config)
    rope = getattr(text, "rope_parameters", None) or {}
    return float(rope.get("rope_theta", getattr(text, "rope_theta", 1_000_000.0)))


def transformer_config(hf_config: Any, tp: int, pp: int, split: PipelineSplit, dtype: torch.dtype,
                       recompute: bool = False, sequence_parallel: bool = False):
    """megatron-core's TransformerConfig for the Qwen2.5 language model: RMSNorm, SwiGLU, QKV bias and no
    other linear bias, grouped-query attention, no dropout; fusions that need CUDA kernels only on GPUs."""
    from megatron.core.transformer import TransformerConfig

    text = text_config_of(hf_config)
    dims = TextDims.from_hf_config(hf_config)
    on_gpu = torch.cuda.is_available()
    kwargs = dict(
        num_layers=dims.num_layers,
        hidden_size=dims.hidden_size,
        num_attention_heads=dims.num_heads,
        num_query_groups=dims.num_kv_heads,
        kv_channels=dims.head_dim,
        ffn_hidden_size=dims.ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=float(text.rms_norm_eps),
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=dims.qkv_bias,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        # the fused kernels are CUDA/apex ones; on the CPU the plain torch paths run
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        sequence_parallel=sequence_parallel and tp > 1,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu_initialization=not on_gpu,
        perform_initialization=False,  # every weight is loaded from the Hugging Face checkpoint
        mrope_section=mrope_section_of(hf_config),
        variable_seq_lengths=True,  # packed rows and RL micro-batches differ in length
        calculate_per_token_loss=True,  # the schedule must not divide our (globally normalised) losses
        moe_token_dispatcher_type="alltoall",  # dense model; the default one refuses variable lengths
        **split.mcore_kwargs(),
    )
    if recompute:
        kwargs.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    return TransformerConfig(**kwargs)


class LocalRMSNorm(nn.RMSNorm):
    """torch's RMSNorm, built the way megatron-core builds norms. megatron-core's own torch norm refuses
    sequence parallelism only because nothing would sum its weight's partial gradients over the
    tensor-parallel ranks; our engine does that (`MegatronEngine.step`)."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **unused):
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)


def block_spec(use_te: bool, num_layers: int):
    """The decoder's layer spec: Transformer Engine's, or the local one with `LocalRMSNorm` (the layers'
    two norms and the final norm) for the `num_layers` layers of this stage."""
    import copy

    from megatron.core.models.gpt import gpt_layer_specs
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    if use_te:
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec()
    layer = copy.deepcopy(gpt_layer_specs.get_gpt_layer_local_spec(normalization="RMSNorm"))
    layer.submodules.input_layernorm = LocalRMSNorm
    layer.submodules.pre_mlp_layernorm = LocalRMSNorm
    return TransformerBlockSubmodules(layer_specs=[layer] * num_layers, layer_norm=LocalRMSNorm)


def sample_boundaries(text_positions: torch.Tensor) -> torch.Tensor:
    """Start offsets of the packed samples (and the row length at the end) from the text-position row,
    which restarts at 0 for every sample: cu_seqlens [S + 1] int32."""
    starts = (text_positions == 0).nonzero().flatten()
    if starts.numel() == 0 or int(starts[0]) != 0:
        starts = torch.cat([starts.new_zeros(1), starts])
    end = torch.tensor([text_positions.numel()], device=starts.device, dtype=starts.dtype)
    return torch.cat([starts, end]).to(torch.int32)


def block_causal_mask(cu_seqlens: torch.Tensor, length: int) -> torch.Tensor:
    """[1, 1, T, T] bool, True where attention is NOT allowed (megatron-core's convention): causal within
    each packed sample, nothing across samples."""
    sample = torch.repeat_interleave(
        torch.arange(cu_seqlens.numel() - 1, device=cu_seqlens.device), (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    )
    same = sample[:, None] == sample[None, :]
    causal = torch.ones(length, length, dtype=torch.bool, device=cu_seqlens.device).tril()
    return ~(same & causal)[None, None]


def packed_seq_params(cu_seqlens: torch.Tensor):
    from megatron.core.packed_seq_params import PackedSeqParams

    longest = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
                           max_seqlen_q=longest, max_seqlen_kv=longest)


class QwenVLStage(nn.Module):
    """One pipeline stage: [vision tower +] GPTModel stage [+ log-probs through the fused kernel].

    ``language`` is megatron-core's GPTModel with ``pre_process`` on the first stage and ``post_process``
    on the last; its output layer is only read for its weight (the kernel computes the log-probs).
    ``visual`` is the Hugging Face vision tower (first stage only), replicated over tensor-parallel ranks.
    """

    def __init__(self, hf_config: Any, config, spec, pre_process: bool, post_process: bool,
                 visual: Optional[nn.Module], tp_group, use_te: bool, value_head: bool = False, seed: int = 0):
        super().__init__()
        from megatron.core.enums import ModelType
        from megatron.core.models.gpt import GPTModel

        self.config = config  # the pipeline schedule reads these two
        self.model_type = ModelType.encoder_or_decoder

        dims = TextDims.from_hf_config(hf_config)
        self.image_token_id = int(getattr(hf_config, "image_token_id"))
        self.pre_process, self.post_process = pre_process, post_process
        self.tp_group = tp_group if config.tensor_model_parallel_size > 1 else None
        self.use_te = use_te
        self.language = GPTModel(
            config=config,
            transformer_layer_spec=spec,
            vocab_size=padded_vocab_size(dims.vocab_size, config.tensor_model_parallel_size),
            max_sequence_length=int(getattr(text_config_of(hf_config), "max_position_embeddings", 32768)),
            pre_process=pre_process,
            post_process=post_process,
            share_embeddings_and_output_weights=dims.tie_word_embeddings,
            position_embedding_type="mrope",
            rotary_base=rope_theta_of(hf_config),
            parallel_output=True,
            # image embeddings go in first; we split the sequence over TP ranks ourselves after that
            scatter_embedding_sequence_parallel=False,
        )
        self.visual = visual if pre_process else None
        self.value_head = None
        if value_head and post_process:
            # the critic: a bias-free value head, initialised from the seed alone (as `load_critic` does)
            with torch.random.fork_rng():
                torch.manual_seed(seed)
                self.value_head = nn.Linear(dims.hidden_size, 1, bias=False, dtype=config.params_dtype)

    # the pipeline schedule hands the previous stage's output to the decoder through this
    def set_input_tensor(self, input_tensor) -> None:
        self.language.set_input_tensor(input_tensor)

    def forward(self, input_ids, position_ids, targets=None, pixel_values=None, image_grid_thw=None,
                temperature: float = 1.0, return_entropy: bool = False):
        from megatron.core import tensor_parallel

        lm = self.language
        length = input_ids.shape[-1]
        sequence_parallel = self.config.sequence_parallel
        if sequence_parallel:  # the row must split evenly over the TP ranks: pad it with a no-loss sample
            input_ids, position_ids = pad_row(input_ids, position_ids, self.config.tensor_model_parallel_size)
        text_positions, mrope_positions = position_ids[0, 0], position_ids[1:]  # [T], [3, 1, T]
        cu_seqlens = sample_boundaries(text_positions)
        decoder_input = None
        if self.pre_process:
            decoder_input = lm.embedding(input_ids=input_ids, position_ids=None)  # [T, 1, H]
            if pixel_values is not None:
                decoder_input = self.place_image_embeddings(decoder_input, input_ids, pixel_values, image_grid_thw)
            if sequence_parallel:
                decoder_input = tensor_parallel.scatter_to_sequence_parallel_region(decoder_input, group=self.tp_group)
        rotary = lm.rotary_pos_emb(mrope_positions, lm.mrope_section)
        if self.use_te:
            mask, packed = None, packed_seq_params(cu_seqlens)
        else:
            mask, packed = block_causal_mask(cu_seqlens, input_ids.shape[-1]), None
        hidden = lm.decoder(hidden_states=decoder_input, attention_mask=mask, rotary_pos_emb=rotary,
                            packed_seq_params=packed)
        if not self.post_process:
            return hidden.to(self.config.pipeline_dtype)  # what the next stage receives
        if sequence_parallel:
            # the kernel needs every position on every TP rank; it all-reduces the hidden-state gradient
            # itself, so the gather's backward only takes this rank's part
            hidden = tensor_parallel.gather_from_sequence_parallel_region(
                hidden, tensor_parallel_output_grad=False, group=self.tp_group)
        hidden = hidden[:length, 0]
        if self.value_head is not None:
            return self.value_head(hidden).squeeze(-1).float()
        from ovr_hpc.kernels import fused_logprobs

        weight = lm.shared_embedding_or_output_weight() if lm.share_embeddings_and_output_weights \
            else lm.output_layer.weight
        return fused_logprobs(hidden, weight.to(hidden.dtype), targets, temperature=temperature,
                              return_entropy=return_entropy, tp_group=self.tp_group)

    def place_image_embeddings(self, embeddings, input_ids, pixel_values, image_grid_thw):
        """The vision tower's merged patch embeddings replace the image-pad tokens' embeddings, in order."""
        out = self.visual(pixel_values.to(next(self.visual.parameters()).dtype), grid_thw=image_grid_thw)
        image_embeds = out.pooler_output if hasattr(out, "pooler_output") else out
        is_image = (input_ids[0] == self.image_token_id)
        if int(is_image.sum()) != image_embeds.shape[0]:
            raise ValueError(f"{int(is_image.sum())} image tokens in the row but the vision tower gave "
                             f"{image_embeds.shape[0]} embeddings")
        embeddings = embeddings.clone()
        embeddings[is_image.nonzero().flatten(), 0] = image_embeds.to(embeddings.dtype)
        return embeddings


def pad_row(input_ids, position_ids, multiple: int):
    """Pad a packed row to a multiple of `multiple` tokens with one extra sample (token 0, positions from 0:
    a sample of its own, which nothing attends to and which carries no loss)."""
    pad = -input_ids.shape[-1] % multiple
    if pad == 0:
        return input_ids, position_ids
    ids = torch.cat([input_ids, input_ids.new_zeros(1, pad)], dim=1)
    extra = torch.arange(pad, device=position_ids.device, dtype=position_ids.dtype).expand(position_ids.shape[0], 1, pad)
    return ids, torch.cat([position_ids, extra], dim=2)


def build_stage(hf_config: Any, visual: Optional[nn.Module], tp: int, pp: int, pp_rank: int, split: PipelineSplit,
                dtype: torch.dtype, use_te: bool, tp_group, recompute: bool = False, value_head: bool = False,
                seed: int = 0, sequence_parallel: bool = False) -> QwenVLStage:
    """Stage `pp_rank` of the model (call after megatron-core's `initialize_model_parallel`)."""
    config = transformer_config(hf_config, tp, pp, split, dtype, recompute, sequence_parallel)
    spec = block_spec(use_te, split.layers_per_stage[pp_rank])
    return QwenVLStage(hf_config, config, spec, pre_process=pp_rank == 0,
                       post_process=pp_rank == pp - 1, visual=visual, tp_group=tp_group, use_te=use_te,
                       value_head=value_head, seed=seed)
