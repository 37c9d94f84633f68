"""Buddy's routed forward over vLLM's own Llama and Qwen2 layers.

Each step's tokens are flattened ([T]). Layer 0 runs for every token; its K/V (after rotary, the layout of
Buddy's engine: heads concatenated, K then V) feed the running prefix mean that, with the layer-0 output
and the request's budget, is the Decision Module's input. The plan is exact top-(k-2) of router + prior
scores per token (the gate, where the router has one, falls back to the prior's plan per token).

Then, for every layer i >= 1 that some token of the step executes, attention runs for all tokens of the
step, so that every token's K/V for layer i is written into vLLM's paged cache (the kernel takes the whole
step's metadata). What differs by KV policy and plan:
- `fill`: a skipped token's K/V are computed from its unchanged residual stream, as in Buddy's engine;
- `zero`: a skipped token's K and V are multiplied by zero before the write, so a reused paged block never
  holds another request's values.
The output projection and the MLP run only for the tokens that execute the layer (gathered rows), and only
those tokens' residual streams change. So a mixed batch pays attention for all tokens and the rest of each
layer for its executing tokens only; docs/vllm.md states the cost. A layer that no token of the step
executes runs no attention at all: its K/V (computed from the unchanged streams under `fill`, zeros under
`zero`) are written into the paged cache by the backend's own cache write (`unified_kv_cache_update`).
"""

from __future__ import annotations

import torch
from torch import nn
from vllm.distributed import (
    get_tensor_model_parallel_world_size,
    get_tp_group,
    tensor_model_parallel_all_gather,
)
from vllm.distributed.kv_transfer import has_kv_transfer_group
from vllm.forward_context import get_forward_context, is_forward_context_available
from vllm.model_executor.layers.attention.attention import unified_kv_cache_update
from vllm.model_executor.models.llama import LlamaForCausalLM
from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM

from ..allocation import DepthConfig, DepthHead, TokenAccount
from ..budget import Budget
from ..planner import topk_plan
from ..predictor import BudgetPredictor, PredictorConfig, pool_features
from ..router import DecisionModule, RouterConfig, prior_scores
from .batch_state import AUTO_K, BuddyBatchState


def _query_start_loc() -> torch.Tensor | None:
    """[num_requests + 1] token offsets of the step's requests, or None in vLLM's dummy/profile runs."""
    if not is_forward_context_available():
        return None
    md = get_forward_context().attn_metadata
    if not md:
        return None
    m = next(iter(md.values())) if isinstance(md, dict) else md
    qsl = getattr(m, "query_start_loc", None)
    return None if qsl is None else qsl.long().cpu()


class _Buddy:
    """Mixin over a vLLM CausalLM: the Decision Module, the prior and the routed forward."""

    def _init_buddy(self, vllm_config) -> None:
        hf = vllm_config.model_config.hf_config
        b = getattr(hf, "buddy", None)
        if not b:
            raise ValueError("this checkpoint has no `buddy` section in config.json: make it with "
                             "`buddy export --format vllm`")
        if vllm_config.parallel_config.pipeline_parallel_size != 1:
            raise ValueError("Buddy models in vLLM support tensor parallelism, not pipeline parallelism")
        if vllm_config.cache_config.enable_prefix_caching:
            raise ValueError("Buddy models need prefix caching off (cached K/V depend on each request's plan): "
                             "pass enable_prefix_caching=False or --no-enable-prefix-caching")
        self.n_layers = hf.num_hidden_layers
        if getattr(hf, "qk_norm", False):
            raise ValueError("Buddy models in vLLM do not support qk_norm attention (the routed layers compute Q/K/V "
                             "themselves)")
        self.kv_policy = b["kv_policy"]
        self.default_k = int(b["default_layers"])
        # float32 from the start (vLLM builds modules in the model's dtype): the weights (float32 in the export) load
        # unrounded and the top-k and argmax run as in Buddy's engine
        self.buddy_router = DecisionModule(RouterConfig(**b["router"])).float()
        self.buddy_predictor = BudgetPredictor(PredictorConfig(**b["predictor"])).float() if b.get("predictor") else None
        self.register_buffer("buddy_prior", prior_scores(b["prior_order"], self.n_layers), persistent=False)
        BuddyBatchState.n_layers, BuddyBatchState.default_k = self.n_layers, self.default_k
        self.buddy_depth = DepthHead(DepthConfig(**b["depth"])).float() if b.get("depth") else None
        BuddyBatchState.has_predictor = self.buddy_predictor is not None
        BuddyBatchState.has_depth = self.buddy_depth is not None

    def _all_kv_heads(self, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Layer 0's K and V (after rotary) of this rank's KV heads -> of all KV heads, in Buddy's layout (K heads
        then V heads), so that the router reads every head on every tensor-parallel rank. vLLM splits the KV
        heads over the ranks in order, or, with fewer heads than ranks, gives rank r head r // copies."""
        tp = get_tensor_model_parallel_world_size()
        if tp == 1:
            return torch.cat([k, v], dim=-1)
        kv = tensor_model_parallel_all_gather(torch.cat([k, v], dim=-1), dim=-1)  # one gather: [k0 v0 k1 v1 ...]
        kv = kv.view(kv.shape[0], tp, 2, -1)[:, :: self.model.layers[0].self_attn.qkv_proj.num_kv_head_replicas]
        return torch.cat([kv[:, :, 0].flatten(1), kv[:, :, 1].flatten(1)], dim=-1)

    @staticmethod
    def _same_on_every_rank(x: torch.Tensor) -> torch.Tensor:
        """Rank 0's x on every tensor-parallel rank: the ranks must skip the same layers (a rank whose plan
        differed by a rounding tie would run its all-reduces on other rows), so they take rank 0's."""
        if get_tensor_model_parallel_world_size() == 1:
            return x
        return get_tp_group().broadcast(x.contiguous(), src=0)

    # --- per-token inputs of the router ---
    def _per_token(self, positions: torch.Tensor, kv0: torch.Tensor, h0: torch.Tensor):
        """(k per token [T], prefix mean of layer-0 K/V per token [T, D]) for this step's tokens. A budget
        "auto" request gets its k from the budget predictor at its first scheduled prompt tokens, from the
        features Buddy's engine uses (`predictor.pool_features`: pooled layer-0 K/V after the last token, mean
        and last layer-0 state); a prompt longer than one scheduled chunk is judged by that chunk."""
        T, D = kv0.shape
        st, qsl = BuddyBatchState.instance, _query_start_loc()
        x = kv0.float()
        if st is None or qsl is None or qsl[-1] != T:  # a dummy run, or no batch state: each token alone
            csum = torch.cumsum(x, 0)
            ks = torch.full((T,), self.default_k, dtype=torch.long)
            return ks, csum / torch.arange(1, T + 1, dtype=torch.float32, device=x.device)[:, None]
        counts = qsl[1:] - qsl[:-1]
        ks = torch.repeat_interleave(st.k[: counts.numel()], counts)
        means = torch.zeros_like(x)
        pos = positions.cpu()
        for r in range(counts.numel()):
            a, e = int(qsl[r]), int(qsl[r + 1])
            if a == e or (int(st.k[r]) == self.n_layers and not st.per_token[r]):
                continue  # a request at full depth runs every layer: its router inputs are never read
            s, n = (torch.zeros(D), 0.0) if int(pos[a]) == 0 else st.history(r, D)
            c = s.to(x.device) + torch.cumsum(x[a:e], 0)
            m = n + torch.arange(1, e - a + 1, dtype=torch.float32, device=x.device)
            means[a:e] = c / m[:, None]
            st.remember(r, c[-1].cpu(), float(m[-1]))
            if int(st.k[r]) == AUTO_K:
                k = st.chosen_k(r)
                if k is None:
                    feats = pool_features(means[None, a:e], h0[None, a:e])
                    k = Budget(fraction=self.buddy_predictor.choose(feats)[0]).k(self.n_layers)
                st.choose(r, k)
                ks[a:e] = k
            if st.per_token[r]:
                self._token_depths(st, r, pos[a:e], h0[a:e], ks[a:e])
        return ks.to(kv0.device), means

    def _token_depths(self, st: BuddyBatchState, r: int, pos: torch.Tensor, h0: torch.Tensor, ks: torch.Tensor):
        """allocation "token": Buddy's layer account (buddy/allocation.py) for one request's tokens of this step,
        written into ks in place. Prompt tokens run at k and the prompt's last one counts as the first
        generated token; each later token takes its depth from the depth head and the account. A position
        counted before (vLLM recomputing a preempted request) runs at k and is not counted again."""
        acc = st.account(r)
        k, prompt_end = int(ks[0]), st.prompt_len[r] - 1
        for t, p in enumerate(pos.tolist()):
            if p < prompt_end or p <= acc[2]:
                continue
            if p == prompt_end:
                acc[0], acc[1] = acc[0] + 1, acc[1] + k
            else:
                account = TokenAccount(self.buddy_depth, [k], [True], self.n_layers)
                account.count[0], account.total[0] = acc[0], acc[1]
                ks[t] = int(account.depths(h0[t][None, None], prompt=False)[0, 0])
                acc[0], acc[1] = int(account.count[0]), int(account.total[0])
            acc[2] = p

    def _plan(self, h0: torch.Tensor, kv0_mean: torch.Tensor, ks: torch.Tensor) -> torch.Tensor:
        """[T, L] bool: exactly ks[t] layers per token (layer 0 and L-1 always)."""
        frac = ks.float() / self.n_layers
        scores, gate = self.buddy_router.heads(kv0_mean[:, None], h0[:, None], frac)
        prior = self.buddy_prior.to(scores.device)
        plan = topk_plan(scores + prior, ks)
        if gate is not None:
            plan = torch.where(gate[..., None] > 0, plan, topk_plan(prior.expand_as(scores), ks))
        return plan[:, 0]

    # --- one layer ---
    def _qkv(self, layer, positions, x):
        attn = layer.self_attn
        qkv, _ = attn.qkv_proj(x)
        q, k, v = qkv.split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
        return (*attn.rotary_emb(positions, q, k), v)

    def _layer(self, layer, positions, h, runs: torch.Tensor | None):
        """h [T, H] -> h after the layer for the tokens with runs[t] (all when runs is None)."""
        attn = layer.self_attn
        q, k, v = self._qkv(layer, positions, layer.input_layernorm(h))
        if runs is not None and self.kv_policy == "zero":
            keep = runs[:, None].to(k.dtype)
            k, v = k * keep, v * keep
        o = attn.attn(q, k, v)  # writes every token's K/V for this layer into the paged cache
        if runs is None:
            h = h + attn.o_proj(o)[0]
            return h + layer.mlp(layer.post_attention_layernorm(h))
        rows = runs.nonzero().flatten()
        if rows.numel() == 0:
            return h
        hr = h[rows] + attn.o_proj(o[rows])[0]
        hr = hr + layer.mlp(layer.post_attention_layernorm(hr))
        return h.index_copy(0, rows, hr)

    def _write_kv_only(self, layer, positions, h) -> None:
        """No token of the step executes this layer: write its K/V into the paged cache (from the unchanged
        streams under `fill`, zeros under `zero`) through the attention backend's own cache write, with no
        query, attention kernel, output projection or MLP."""
        attn = layer.self_attn.attn
        if not is_forward_context_available():
            return
        if attn.kv_sharing_target_layer_name is not None:
            return  # the layer reads another layer's cache and writes none
        if attn.attn_backend.forward_includes_kv_cache_update or has_kv_transfer_group():
            # the cache write is inside the attention op, or a KV connector saves each layer's K/V around it:
            # run the op, change no stream
            self._layer(layer, positions, h, torch.zeros(h.shape[0], dtype=torch.bool, device=h.device))
            return
        if self.kv_policy == "zero":
            k = h.new_zeros(h.shape[0], attn.num_kv_heads * attn.head_size)
            v = h.new_zeros(h.shape[0], attn.num_kv_heads * attn.head_size_v)
        else:
            _, k, v = self._qkv(layer, positions, layer.input_layernorm(h))
        unified_kv_cache_update(k.view(-1, attn.num_kv_heads, attn.head_size),
                                v.view(-1, attn.num_kv_heads, attn.head_size_v), attn.layer_name)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs):
        m = self.model
        h = m.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        layer0 = m.layers[0]
        q, k, v = self._qkv(layer0, positions, layer0.input_layernorm(h))
        o = layer0.self_attn.attn(q, k, v)
        h = h + layer0.self_attn.o_proj(o)[0]
        h = h + layer0.mlp(layer0.post_attention_layernorm(h))
        ks, kv0_mean = self._per_token(positions, self._all_kv_heads(k, v), h)
        ks = self._same_on_every_rank(ks)
        if bool((ks == self.n_layers).all()):  # every token runs every layer: no plan to make
            runs_all, runs_any, plan = [True] * self.n_layers, [True] * self.n_layers, None
        else:
            plan = self._same_on_every_rank(self._plan(h, kv0_mean, ks).to(torch.uint8)).bool()
            runs_all, runs_any = plan.all(dim=0).tolist(), plan.any(dim=0).tolist()
        for i in range(1, self.n_layers):
            if runs_all[i]:
                h = self._layer(m.layers[i], positions, h, None)
            elif runs_any[i]:
                h = self._layer(m.layers[i], positions, h, plan[:, i])
            else:
                self._write_kv_only(m.layers[i], positions, h)
        return m.norm(h)


class BuddyLlamaForCausalLM(_Buddy, LlamaForCausalLM):
    def __init__(self, *, vllm_config, prefix: str = "", **kwargs):
        super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
        self._init_buddy(vllm_config)


class BuddyQwen2ForCausalLM(_Buddy, Qwen2ForCausalLM):
    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._init_buddy(vllm_config)


__all__ = ["BuddyLlamaForCausalLM", "BuddyQwen2ForCausalLM", "nn"]
