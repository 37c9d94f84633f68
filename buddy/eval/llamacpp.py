"""llama.cpp timed beside Buddy (`buddy bench latency --compare llama.cpp`): the same GGUF file, the same
prompt tokens, the same thread count, greedy decoding, time to first token and median ms per later token.

Needs the `llamacpp` extra (llama-cpp-python built from source; `make setup-llamacpp` has the build flags
that work on CPUs where the default native build crashes)."""

from __future__ import annotations

import statistics
import time

from ..errors import require_extra


def time_llamacpp(gguf_path, prompt: list[int], new_tokens: int, repeats: int, threads: int) -> tuple[float, float]:
    """(time to first token ms, median ms per later token) of llama.cpp decoding `prompt` greedily."""
    require_extra("llama_cpp", "llamacpp", "--compare llama.cpp")
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf_path), n_ctx=len(prompt) + new_tokens + 8, n_threads=threads,
                n_threads_batch=threads, n_batch=max(len(prompt), 8), verbose=False)

    def run(n):
        llm.reset()
        stamps = [time.perf_counter()]
        for i, _ in enumerate(llm.generate(prompt, top_k=1, temp=0.0, reset=True)):
            stamps.append(time.perf_counter())
            if i + 1 >= n:
                break
        return stamps

    run(2)  # warm-up
    ttfts, steps = [], []
    for _ in range(repeats):
        s = run(new_tokens)
        ttfts.append(1000 * (s[1] - s[0]))
        steps.append(statistics.median(1000 * (b - a) for a, b in zip(s[1:], s[2:])))
    llm.close()
    return statistics.median(ttfts), statistics.median(steps)
