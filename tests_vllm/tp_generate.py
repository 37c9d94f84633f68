"""Greedy tokens of a tests_vllm reference export on two tensor-parallel ranks (vLLM's CPU build). Run as a
script (vLLM's multiprocessing executor spawns the ranks): python tp_generate.py EXPORT ASKS_JSON. Generates
the asks in one batch, then each alone (a request alone skips whole layers: their K/V are only written);
prints "TOKENS" and a JSON list: the batch's tokens, then each alone request's."""

import json
import os
import sys

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")

if __name__ == "__main__":
    from vllm import LLM, SamplingParams

    export, asks = sys.argv[1], json.loads(sys.argv[2])
    llm = LLM(model=export, dtype="float32", enforce_eager=True, enable_prefix_caching=False, max_model_len=128,
              max_num_seqs=8, seed=0, tensor_parallel_size=2, distributed_executor_backend="mp")
    params = [SamplingParams(max_tokens=len(a["tokens"]), temperature=0, ignore_eos=True,
                             extra_args={"layers": a["layers"]}) for a in asks]
    prompts = [{"prompt_token_ids": a["prompt_ids"]} for a in asks]
    out = llm.generate(prompts, params, use_tqdm=False)
    out += [o for p, sp in zip(prompts, params) for o in llm.generate([p], [sp], use_tqdm=False)]
    print("TOKENS", json.dumps([list(o.outputs[0].token_ids) for o in out]), flush=True)
