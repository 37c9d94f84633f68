"""Buddy inside vLLM: an out-of-tree model plugin (entry point group `vllm.general_plugins`).

    buddy export --format vllm --model smollm2 --out smollm2-vllm      # then, in an environment with vLLM:
    python -c "from vllm import LLM, SamplingParams; ..."               # vllm.LLM(model="smollm2-vllm")
    vllm serve smollm2-vllm --no-enable-prefix-caching

`register()` names two architectures, `BuddyLlamaForCausalLM` and `BuddyQwen2ForCausalLM` (lazily imported
from `buddy.vllm_plugin.model`). They subclass vLLM's own Llama and Qwen2 models, so the weights, the
parallel linear layers and the attention kernels are vLLM's; Buddy adds the Decision Module, the prior and
a per-token plan at every step. A request's budget arrives in `SamplingParams.extra_args` (`{"budget": 0.5}`
or `{"layers": 12}`; REST: `vllm_xargs`) and reaches the model through `BuddyBatchState`, a vLLM logits
processor (entry point group `vllm.logits_processors`) that never changes logits. See docs/vllm.md.

Nothing here imports vLLM at module level: Buddy works without it.
"""

ARCHITECTURES = {"llama": "BuddyLlamaForCausalLM", "qwen2": "BuddyQwen2ForCausalLM"}


def register() -> None:
    """Called by vLLM in every process before a model loads; idempotent."""
    from vllm import ModelRegistry

    for arch in ARCHITECTURES.values():
        if arch not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(arch, f"buddy.vllm_plugin.model:{arch}")
