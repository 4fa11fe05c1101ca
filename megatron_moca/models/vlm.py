"""The composed model: Qwen2.5-VL vision tower + Qwen2 LLM on megatron-core, bidirectional or causal.

Pipeline-aware: the vision tower and the embedding live on the first stage, the final norm and the
output layer on the last. `forward` returns hidden states [s, b, h] (after the final norm on the last
stage); `logits` applies the output layer (vocab-parallel) to any selection of them, so heads (MLM
at masked positions only, MAE decoder, pooling) never need logits for every position. The model
knows nothing of losses or the training loop.

Batch convention (all stages receive the same batch):
  input_ids [b, s]; position_ids [3, b, s] M-RoPE ids (computed if None);
  document_ids [b, s] (packed-document index per token, negative = padding; None = one document
  per row, no padding); pixel_values [N, 1176] and image_grid_thw [n, 3] for the images in order.
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel
from megatron.core.enums import ModelType
from megatron.core.models.gpt.gpt_model import GPTModel
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

from megatron_moca.config.model import ModelConfig
from megatron_moca.errors import UserError
from megatron_moca.models.attention import allowed_from_document_ids, thd_params
from megatron_moca.models.heads import MaeDecoder
from megatron_moca.models.norms import RMSNorm
from megatron_moca.models.rope_index import get_rope_index
from megatron_moca.models.specs import available_kernels, llm_layer_spec, resolve_backend, te_refusal
from megatron_moca import compat
from megatron_moca.models.transformer_configs import language_transformer_config, vision_transformer_config
from megatron_moca.models.vision import VisionTower


class MocaVLM(MegatronModule):
    def __init__(self, cfg: ModelConfig, pre_process: Optional[bool] = None, post_process: Optional[bool] = None,
                 initialize: bool = True, vision_on_text_batches: bool = False, mae_decoder: bool = False):
        """vision_on_text_batches: in training, run the vision tower on a dummy image for batches without
        images (zero gradients), for data-parallel wrappers that need every parameter's gradient on
        every step (e.g. megatron DDP with overlapped grad reduction). Costs a vision pass per text batch.
        mae_decoder: build MoCa's stage-1 MAE decoder on the last stage (models/heads.py; its layer is
        random until `heads.initialize_mae_decoder` copies LLM layer L//2 into it).
        """
        cfg.validate(ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size())
        llm_config = language_transformer_config(cfg, initialize)
        super().__init__(config=llm_config)
        self.cfg = cfg
        self.model_type = ModelType.encoder_or_decoder  # read by megatron's schedules
        self.pre_process = ps.is_pipeline_first_stage() if pre_process is None else pre_process
        self.post_process = ps.is_pipeline_last_stage() if post_process is None else post_process
        self.backend = resolve_backend(cfg.attention_backend)
        if cfg.fp8 and self.backend != "te":
            raise UserError(f"model.fp8={cfg.fp8!r} needs Transformer Engine on a GPU (the te backend); this "
                            f"machine resolves attention_backend={cfg.attention_backend!r} to {self.backend!r}: "
                            "set model.fp8=null")
        self.causal = cfg.attention == "causal"
        self.vision_on_text_batches = vision_on_text_batches
        compat.route_megatron_rotary()  # the LLM's rotary in fewer kernels, bit-identical (models/rotary.py)
        compat.quiet_megatron_logs()
        layer_spec = llm_layer_spec(self.backend, self.causal)
        if self.backend == "te" and not available_kernels()["te_standin"]:
            from megatron.core.extensions.transformer_engine import TENorm as final_norm
        else:  # the local spec's norm (also under the TE stand-in, which replaces only TE's attention)
            final_norm = RMSNorm
        block = TransformerBlockSubmodules(layer_specs=[layer_spec] * get_num_layers_to_build(llm_config),
                                           layer_norm=final_norm)
        lang = cfg.language
        self.language = GPTModel(
            config=llm_config, transformer_layer_spec=block, vocab_size=lang.vocab_size,
            max_sequence_length=lang.max_position_embeddings, pre_process=self.pre_process,
            post_process=self.post_process, parallel_output=True,
            share_embeddings_and_output_weights=lang.tie_word_embeddings, position_embedding_type="mrope",
            rotary_base=int(lang.rope_theta))
        self.vision = (VisionTower(vision_transformer_config(cfg, initialize), cfg.vision, lang.hidden_size,
                                   recompute=cfg.recompute_granularity == "full") if self.pre_process else None)
        self.mae_decoder = (MaeDecoder(llm_config, layer_spec, cfg.vision.merge_unit * cfg.vision.patch_dim,
                                       layer_number=len(self.language.decoder.layers) + 1)
                            if mae_decoder and self.post_process else None)

    # -- pipeline plumbing -------------------------------------------------------------------------
    def set_input_tensor(self, input_tensor) -> None:
        self.language.set_input_tensor(input_tensor)

    @property
    def share_embeddings_and_output_weights(self) -> bool:
        """Read by megatron's finalize_model_grads (tied embeddings: first/last-stage grads summed)."""
        return self.language.share_embeddings_and_output_weights

    def shared_embedding_or_output_weight(self):
        return self.language.shared_embedding_or_output_weight()

    def set_attention(self, mode: str) -> None:
        """Switch 'bidirectional' <-> 'causal' after construction (not with TE, which caches it)."""
        from megatron.core.transformer.enums import AttnMaskType

        if mode not in ("bidirectional", "causal"):
            raise UserError(f"attention mode {mode!r}: expected 'bidirectional' or 'causal'")
        if self.backend == "te":
            raise UserError("the TE backend fixes the attention mask type at construction; rebuild the model")
        self.causal = mode == "causal"
        self.cfg.attention = mode
        mask_type = AttnMaskType.causal if self.causal else AttnMaskType.no_mask
        for layer in self.language.decoder.layers:
            layer.self_attention.attn_mask_type = mask_type
            layer.self_attention.core_attention.attn_mask_type = mask_type

    # -- pieces ------------------------------------------------------------------------------------
    def position_ids(self, input_ids, image_grid_thw=None, document_ids=None) -> torch.Tensor:
        return get_rope_index(input_ids, image_grid_thw, image_token_id=self.cfg.tokens.image_token_id,
                              spatial_merge_size=self.cfg.vision.spatial_merge_size, document_ids=document_ids)[0]

    def attention_mask(self, document_ids: Optional[torch.Tensor], batch: int, seq: int, device):
        """(the mask the chosen backend takes - see models/attention.py for the convention -, PackedSeqParams
        for Transformer Engine's THD layout or None)."""
        if document_ids is not None and bool((document_ids == document_ids[:, :1]).all()) \
                and bool((document_ids[:, 0] >= 0).all()):
            document_ids = None  # one document per row, no padding: the unmasked fast path
        if self.backend == "local":
            # the stock attention ignores attn_mask_type when given a mask: build it complete
            ids = document_ids if document_ids is not None else torch.zeros(batch, seq, dtype=torch.long,
                                                                                 device=device)
            return ~allowed_from_document_ids(ids, self.causal), None
        if self.backend == "te":
            # the TE spec is built with a padding(_causal) mask type: a key-padding mask for rows of one
            # document (sbhd), THD sequences for packed rows (the padding at the end is one more sequence)
            if document_ids is None:
                return torch.zeros(batch, 1, 1, seq, dtype=torch.bool, device=device), None
            if batch != 1:
                raise UserError(f"attention_backend='te': {te_refusal(batch)}")
            return None, thd_params(document_ids)
        return document_ids, None

    def embed(self, input_ids, pixel_values=None, image_grid_thw=None) -> torch.Tensor:
        """Token embeddings [s, b, h] with the vision tower's outputs at the <|image_pad|> positions."""
        emb = self.language.embedding(input_ids=input_ids, position_ids=None)
        if pixel_values is not None:
            vis = self.vision(pixel_values, image_grid_thw).to(emb.dtype)
            slots = input_ids == self.cfg.tokens.image_token_id
            if int(slots.sum()) != vis.shape[0]:
                raise ValueError(f"{int(slots.sum())} <|image_pad|> tokens but the images give {vis.shape[0]} "
                                 "embeddings")
            emb = emb.transpose(0, 1).masked_scatter(slots[..., None], vis).transpose(0, 1).contiguous()
        elif self.vision_on_text_batches and self.training and self.vision is not None:
            # text-only batch: keep every vision parameter in the graph (zero gradient) so DDP buckets
            # and the distributed optimizer see the same parameter set on every step
            dummy = self.vision(torch.zeros(self.cfg.vision.merge_unit, self.cfg.vision.patch_dim, device=emb.device),
                                torch.tensor([[1, self.cfg.vision.spatial_merge_size, self.cfg.vision.spatial_merge_size]]))
            emb = emb + 0.0 * dummy.sum().to(emb.dtype)
        return emb

    def attention_context(self, input_ids, position_ids=None, document_ids=None, image_grid_thw=None):
        """(attention mask, rotary embedding, packed_seq_params) of a batch: what every LLM layer (and the MAE
        decoder) takes."""
        b, s = input_ids.shape
        if position_ids is None:
            position_ids = self.position_ids(input_ids, image_grid_thw, document_ids)
        mask, packed = self.attention_mask(document_ids, b, s, input_ids.device)
        rope = self.language.rotary_pos_emb
        if rope.inv_freq.device != input_ids.device:
            # megatron keeps inv_freq as a plain attribute made on the current CUDA device (not a buffer:
            # module.to() leaves it), so a model used on the CPU of a GPU machine must move it itself
            rope.inv_freq = rope.inv_freq.to(input_ids.device)
        return mask, rope(position_ids, self.config.mrope_section), packed

    def forward(self, input_ids: torch.Tensor, position_ids: Optional[torch.Tensor] = None,
                document_ids: Optional[torch.Tensor] = None, pixel_values: Optional[torch.Tensor] = None,
                image_grid_thw: Optional[torch.Tensor] = None) -> torch.Tensor:
        mask, rotary, packed = self.attention_context(input_ids, position_ids, document_ids, image_grid_thw)
        hidden = self.embed(input_ids, pixel_values, image_grid_thw) if self.pre_process else None
        return self.language.decoder(hidden_states=hidden, attention_mask=mask, rotary_pos_emb=rotary,
                                     packed_seq_params=packed)

    def mae_predictions(self, hidden: torch.Tensor, select: torch.Tensor, input_ids: torch.Tensor,
                        position_ids: Optional[torch.Tensor] = None, document_ids: Optional[torch.Tensor] = None,
                        image_grid_thw: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The MAE decoder (last stage) on final hidden states [s, b, h] of the batch they came from:
        [n, merge_unit * patch_dim] pixel predictions at the True positions of select [b, s], row-major."""
        if self.mae_decoder is None:
            raise UserError("this model has no MAE decoder: build it with mae_decoder=True (last stage)")
        mask, rotary, packed = self.attention_context(input_ids, position_ids, document_ids, image_grid_thw)
        return self.mae_decoder(hidden, mask, rotary, select, packed)

    def logits(self, hidden: torch.Tensor, gather: bool = False) -> torch.Tensor:
        """Output layer on hidden states [..., h] (last stage): vocab-parallel logits, or full if gather."""
        weight = self.language.shared_embedding_or_output_weight() if self.cfg.language.tie_word_embeddings else None
        out, _ = self.language.output_layer(hidden, weight=weight)
        return tensor_parallel.gather_from_tensor_model_parallel_region(out) if gather else out
