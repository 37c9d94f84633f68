"""lm-evaluation-harness model `buddy`: any lm-eval task at a compute budget.

    python -m buddy.harness --model buddy --model_args model=smollm2,planner=router,budget=0.75 \
        --tasks arc_easy --limit 100

`python -m buddy.harness` is lm-eval's own command line with the `buddy` model registered (lm-eval finds
models only among those imported). From Python, `import buddy.harness` registers it for
`lm_eval.simple_evaluate(model="buddy", model_args=...)`.

model_args: model, planner, kv_policy, router, reroute_every, device, dtype (as `buddy.load`), and one of
budget (a fraction in (0, 1]) or layers (an exact count); contexts_per_batch (default 8).
"""

from __future__ import annotations

import warnings

import lm_eval.models  # noqa: F401  (lm-eval's own models stay available beside `buddy`)
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from .config import DEFAULT_KV_POLICY, LoadConfig
from .eval.generation import generate_until
from .eval.zeroshot import score_requests, tokenize_pair


@register_model("buddy")
class BuddyLM(LM):
    def __init__(self, model: str = LoadConfig.model, planner: str | None = None, kv_policy: str = DEFAULT_KV_POLICY,
                 budget=None, layers: int | None = None, router: str | None = None,
                 reroute_every: int = LoadConfig.reroute_every, device: str = LoadConfig.device,
                 dtype: str = LoadConfig.dtype, contexts_per_batch: int = 8, **_ignored):
        """`_ignored`: lm-eval's own settings (batch_size, max_batch_size); batching is contexts_per_batch."""
        super().__init__()
        import torch

        from .api import load

        if str(device).startswith("cuda") and not torch.cuda.is_available():  # lm-eval's default is cuda:0
            warnings.warn(f"device {device!r} is not available here; running on CPU", stacklevel=2)
            device = "cpu"
        from .budget import AUTO, request_budget

        if request_budget(budget, layers) == AUTO:  # the one budget rule; checked before loading anything
            raise ValueError('budget "auto" is not supported in lm-eval: give budget=<fraction> or layers=<count>')
        self.engine = load(model, planner=planner, kv_policy=kv_policy, device=device, dtype=dtype, router=router,
                           reroute_every=int(reroute_every))
        self.k = self.engine.resolve_k(budget, layers)
        self.contexts_per_batch = int(contexts_per_batch)
        self.executed_layers, self.tokens = 0.0, 0

    @property
    def layers_per_token(self) -> float:
        """Measured mean executed layers per token over everything this model has scored or generated."""
        return self.executed_layers / max(self.tokens, 1)

    def _score(self, pairs, disable_tqdm):
        ll, greedy, layers, tokens = score_requests(self.engine, pairs, self.k, self.contexts_per_batch,
                                                    progress=not disable_tqdm, desc="buddy")
        self.executed_layers += layers
        self.tokens += tokens
        return ll, greedy

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        tok = self.engine.tokenizer
        pairs = [tokenize_pair(tok, *r.args[:2]) for r in requests]
        ll, greedy = self._score(pairs, disable_tqdm)
        return list(zip(ll, greedy))

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        tok = self.engine.tokenizer
        max_len = min(self.engine.bb.shapes.max_context, 2048)
        pairs, owner = [], []
        for n, r in enumerate(requests):
            ids = tok(r.args[0])["input_ids"]
            for w in get_rolling_token_windows(ids, tok.eos_token_id, max_len, 1):
                ctx, cont = make_disjoint_window(w)
                pairs.append((list(ctx), list(cont)))
                owner.append(n)
        ll, _ = self._score(pairs, disable_tqdm)
        out = [0.0] * len(requests)
        for n, v in zip(owner, ll):
            out[n] += v
        return out

    def generate_until(self, requests, disable_tqdm: bool = False):
        """Greedy, with continuous batching (contexts_per_batch rows decode together): requests with the same
        max_gen_toks decode in one pass, each stopping at its own `until` strings."""
        jobs = []
        for r in requests:
            context, kwargs = r.args[0], dict(r.args[1] or {})
            until = kwargs.get("until") or []
            jobs.append((context, [until] if isinstance(until, str) else list(until),
                         int(kwargs.get("max_gen_toks", 256))))
        out: list[str] = [""] * len(jobs)
        for max_new in sorted({j[2] for j in jobs}):
            idx = [i for i, j in enumerate(jobs) if j[2] == max_new]
            texts, layers, tokens = generate_until(self.engine, [jobs[i][0] for i in idx], self.k, max_new,
                                                   [jobs[i][1] for i in idx], self.contexts_per_batch,
                                                   progress=not disable_tqdm, desc="buddy")
            self.executed_layers += layers
            self.tokens += tokens
            for i, t in zip(idx, texts):
                out[i] = t
        return out


def main() -> None:
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
