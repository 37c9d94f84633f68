"""Adapters over transformers' own Llama/Mistral/Qwen2/Qwen3 modules: the one place HF internals are touched.

The engine sees a `Backbone` with embed, rope, layer(i), kv(i) (the K/V-only path used by the `fill`
policy), head, and the shapes it needs. Layers run through HF's own decoder-layer forward with Buddy's
KV cache passed as the `cache` argument; no modeling code is copied.
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass

import torch

from ..budget import head_dim_of
from ..errors import BuddyError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


class UnsupportedModelError(BuddyError):
    """The checkpoint's architecture is not one Buddy can route."""


@dataclass(frozen=True)
class Shapes:
    n_layers: int
    hidden: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab: int
    max_context: int


class Backbone:
    """A pretrained causal LM seen as embed -> layers -> norm -> head, with Buddy's routing hooks."""

    def __init__(self, model, tokenizer, name: str, checksum=lambda: "unknown"):
        cfg = model.config
        if cfg.model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModelError(
                f"model_type {cfg.model_type!r} is not supported: use one of {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self._checksum = checksum  # computed on first use: hashing large weight files takes time
        self.quant: dict[str, int] = {}  # quantized linear layers by format (buddy/quant.py); empty: none
        inner = model.model
        self.layers = inner.layers
        self.embed_tokens = inner.embed_tokens
        self.final_norm = inner.norm
        self.rotary = inner.rotary_emb
        self.lm_head = model.lm_head
        head_dim = head_dim_of(cfg)
        window = getattr(cfg, "sliding_window", None)  # Buddy's masks are full causal: cap the context
        max_ctx = cfg.max_position_embeddings if not window else min(window, cfg.max_position_embeddings)
        self.shapes = Shapes(
            n_layers=cfg.num_hidden_layers,
            hidden=cfg.hidden_size,
            n_heads=cfg.num_attention_heads,
            n_kv_heads=cfg.num_key_value_heads,
            head_dim=head_dim,
            vocab=cfg.vocab_size,
            max_context=max_ctx,
        )
        attn_module = sys.modules[type(self.layers[0].self_attn).__module__]
        self._apply_rope = attn_module.apply_rotary_pos_emb
        self._k_norm = cfg.model_type == "qwen3"  # Qwen3 normalises keys per head before RoPE

    @functools.cached_property
    def checksum(self) -> str:
        """sha256 identifying the base weights (router files record it)."""
        return self._checksum()

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    @property
    def n_layers(self) -> int:
        return self.shapes.n_layers

    @property
    def config(self):
        """The checkpoint's transformers config."""
        return self.model.config

    @property
    def eos_ids(self) -> set[int]:
        """Every end-of-sequence id the tokenizer, the generation config and the config name."""
        ids = set()
        for src in (self.tokenizer.eos_token_id if self.tokenizer is not None else None,
                    self.model.generation_config.eos_token_id, self.model.config.eos_token_id):
            if src is not None:
                ids.update(src if isinstance(src, (list, tuple)) else [src])
        return ids

    def freeze(self) -> None:
        """No gradients for the base weights (router training trains only the Decision Module)."""
        for p in self.model.parameters():
            p.requires_grad_(False)

    def replace_head(self, module) -> None:
        """Swap the LM head (quantized modes); the transformers model computes its logits with it too."""
        self.model.lm_head = module
        self.lm_head = module

    def state_dict(self) -> dict:
        return self.model.state_dict()

    def dense_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """transformers' own full-depth forward (no Buddy code): logits [B, T, V] in float32. The teacher of
        router training and the reference of parity checks."""
        return self.model(input_ids).logits.float()

    @property
    def reference_model(self):
        """The transformers model itself, for baselines that time or compare against plain transformers."""
        return self.model

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def rope(self, h: torch.Tensor, positions: torch.Tensor):
        """cos/sin for the given [B, T] positions."""
        return self.rotary(h, positions)

    def layer(self, i: int, h: torch.Tensor, mask, rope, cache) -> torch.Tensor:
        """Run HF's own decoder layer i; it writes its K/V through `cache.update`."""
        return self.layers[i](h, attention_mask=mask, position_embeddings=rope, cache=cache)

    def kv(self, i: int, h: torch.Tensor, rope):
        """Layer i's keys and values for residual stream h ([B, T, H]) without running the layer."""
        attn = self.layers[i].self_attn
        x = self.layers[i].input_layernorm(h)
        shape = (*x.shape[:-1], -1, self.shapes.head_dim)
        k = attn.k_proj(x).view(shape)
        if self._k_norm:
            k = attn.k_norm(k)
        k = k.transpose(1, 2)
        v = attn.v_proj(x).view(shape).transpose(1, 2)
        cos, sin = rope
        _, k = self._apply_rope(k, k, cos, sin)
        return k, v

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head: logits in float32."""
        return self.lm_head(self.final_norm(h)).float()
