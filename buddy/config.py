"""The one home of Buddy's defaults: dataclasses for loading and generation, and the cache directory.

The CLI reads its defaults from these dataclasses; nothing else states a default twice.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .errors import BuddyError

KV_POLICIES = ("fill", "mask", "zero")
DEFAULT_KV_POLICY = KV_POLICIES[0]  # the one place the default KV policy is named
DTYPES = ("auto", "float32", "bfloat16", "float16")
QUANT_MODES = ("none", "int8", "gguf")
ALLOCATIONS = ("request", "token")  # how a budget is spent: every token k layers, or each token its own depth
CALIBRATION_DATA = ("mix", "sotu")  # the text a calibration was measured on; the first is the default
EXPORT_FORMATS = ("hf", "vllm")
EXPORT_PLANNERS = ("static-greedy", "static-bi", "router-prior")
VLLM_KV_POLICIES = ("fill", "zero")  # vLLM's attention kernel has no per-position mask


class ConfigError(BuddyError):
    """A setting is not valid; the message names the value and what is allowed."""


def _one_of(cfg, name: str, allowed: tuple[str, ...]) -> None:
    v = getattr(cfg, name)
    if v not in allowed:
        raise ConfigError(f"invalid {name} {v!r}: must be one of {', '.join(allowed)}")


def cache_dir() -> Path:
    """Where dequantized models, data and other derived files live. Override with BUDDY_CACHE."""
    env = os.environ.get("BUDDY_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "buddy"


@dataclass
class LoadConfig:
    """How to load a model for routed inference.

    model: a registry name (`smollm2`, `qwen-coder-0.5b`) or a local Hugging Face checkpoint directory.
    planner: `router` (trained Decision Module; default when the router, `router` or the shipped one, was
        trained for the KV policy, else `static-greedy`, or `full` without a calibration), `full`,
        `static-bi`, `static-greedy`, `random` (a seeded random static order), the router ablations
        `router-frozen`, `router-noprior`, `prior`; None picks the default.
    kv_policy: what a skipped (layer, token) leaves in the KV cache: `fill`, `mask` or `zero`.
    device: `cpu`, `cuda`, `cuda:N`, or `auto` (CUDA when available).
    dtype: `auto` (bfloat16 on GPUs and on CPUs with native bfloat16, AMX or AVX512-BF16; float32 on other
        CPUs, where emulated bfloat16 is many times slower; see docs/performance.md), `float32`, `bfloat16`, `float16`.
    quant: weight-only quantized linear layers on PyTorch's CPU kernels (see buddy/quant.py): `none` (the
        plain dtype path), `gguf` (the registry model's own 4-bit GGUF blocks), `int8` (8 bits per output row,
        any checkpoint).
    router: a router directory (router.safetensors + router.json); default: the one shipped for the model.
    reroute_every: router planners re-plan every N decode tokens (1 = every token, 0 = frozen after prefill).
    predictor: a budget predictor directory for budget="auto"; default: the one shipped for the model.
    depth: a depth head directory for allocation="token" (`buddy train depth`); default: the one shipped for
        the model and KV policy.
    calibration: the layer calibration behind the static planners: `mix` (measured on the training mix),
        `sotu` (on SOTU speeches, the earlier default), or a JSON file from `buddy calibrate`; default: the
        shipped `mix` calibration, else the shipped `sotu` one.
    """

    model: str = "smollm2"
    planner: str | None = None
    kv_policy: str = DEFAULT_KV_POLICY
    device: str = "auto"
    dtype: str = "auto"
    quant: str = "none"
    router: str | None = None
    reroute_every: int = 1
    predictor: str | None = None
    calibration: str | None = None
    depth: str | None = None

    def __post_init__(self):
        if isinstance(self.reroute_every, bool) or not isinstance(self.reroute_every, int) or self.reroute_every < 0:
            raise ConfigError(f"invalid reroute_every {self.reroute_every!r}: must be an integer >= 0")
        if self.kv_policy not in KV_POLICIES:
            raise ConfigError(f"invalid kv policy {self.kv_policy!r}: must be one of {', '.join(KV_POLICIES)}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"invalid dtype {self.dtype!r}: must be one of {', '.join(DTYPES)}")
        if self.quant not in QUANT_MODES:
            raise ConfigError(f"invalid quant mode {self.quant!r}: must be one of {', '.join(QUANT_MODES)}")


@dataclass
class GenerateConfig:
    """Decoding settings for `generate`.

    max_new_tokens: how many tokens to generate at most (>= 1).
    temperature: 0 means greedy decoding.
    top_p: nucleus sampling threshold when temperature > 0.
    seed: random seed for sampling.
    chat: wrap the prompt in the model's chat template.
    ignore_eos: keep generating past end-of-sequence tokens (benchmarks need a fixed length).
    allocation: `request` (every generated token runs the budget's k layers) or `token` (each token its own
        depth from the depth head; the request's mean stays within half a layer of k; buddy/allocation.py).
    """

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    chat: bool = False
    ignore_eos: bool = False
    allocation: str = ALLOCATIONS[0]

    def __post_init__(self):
        _one_of(self, "allocation", ALLOCATIONS)
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ConfigError(f"invalid max_new_tokens {self.max_new_tokens!r}: must be an integer >= 1")
        if not self.temperature >= 0:
            raise ConfigError(f"invalid temperature {self.temperature!r}: must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"invalid top_p {self.top_p!r}: must be in (0, 1]")


@dataclass
class LatencyConfig:
    """Settings of `buddy bench latency` (the model, device and dtype come from LoadConfig).

    kv_policy: KV policy of the Buddy engines.
    batch: batch sizes, comma-separated.
    prompt_len: prompt lengths in tokens, comma-separated.
    new_tokens: generated tokens per timed run (>= 2: the first is the prefill).
    budgets: budgets (fractions of the layers), comma-separated.
    planners: planners timed besides the full model, comma-separated.
    repeats: timed runs per cell; medians are reported.
    compare: another runtime timed on the same GGUF file, prompts and thread count, its rows beside Buddy's:
        `llama.cpp` (the `llamacpp` extra, `make setup-llamacpp`); empty: none.
    """

    kv_policy: str = DEFAULT_KV_POLICY
    batch: tuple[int, ...] = (1,)
    prompt_len: tuple[int, ...] = (128,)
    new_tokens: int = 64
    budgets: tuple[float, ...] = (1.0, 0.875, 0.75, 0.625, 0.5)
    planners: tuple[str, ...] = ("static-greedy", "router")
    repeats: int = 3
    compare: str = ""

    def __post_init__(self):
        if self.compare not in ("", "llama.cpp"):
            raise ConfigError(f"invalid compare {self.compare!r}: the runtime Buddy times beside itself is llama.cpp")
        if self.kv_policy not in KV_POLICIES:
            raise ConfigError(f"invalid kv policy {self.kv_policy!r}: must be one of {', '.join(KV_POLICIES)}")
        if self.new_tokens < 2:
            raise ConfigError(f"invalid new_tokens {self.new_tokens}: must be >= 2")
        for name in ("batch", "prompt_len"):
            if not getattr(self, name) or min(getattr(self, name)) < 1:
                raise ConfigError(f"invalid {name} {getattr(self, name)!r}: give integers >= 1")
        if self.repeats < 1:
            raise ConfigError(f"invalid repeats {self.repeats}: must be >= 1")


@dataclass
class ServeConfig:
    """Settings of `buddy serve` (the HTTP layer and the continuous-batching scheduler).

    host: bind address; a loopback address (the default) serves this machine only and checks the Host header.
    port: TCP port.
    api_key: require `Authorization: Bearer KEY` on /v1/ routes (None: no key).
    kv_policies: KV policies requests may ask for, comma-separated; the first is the default.
    max_batch: concurrent requests decoding together.
    max_tokens_limit: the largest max_tokens a request may ask for.
    max_body_bytes: larger request bodies get HTTP 413 before they are read.
    log_level: uvicorn's log level.
    """

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    kv_policies: str = ",".join(KV_POLICIES)
    max_batch: int = 16
    max_tokens_limit: int = 1024
    max_body_bytes: int = 2**21
    log_level: str = "warning"

    def __post_init__(self):
        for name in ("max_batch", "max_tokens_limit", "max_body_bytes"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"invalid {name} {v!r}: must be an integer >= 1")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"invalid port {self.port!r}: must be in [0, 65535]")
        bad = [p for p in self.policies if p not in KV_POLICIES] or ([] if self.policies else [""])
        if bad:
            raise ConfigError(f"invalid kv policy {bad[0]!r}: must be one of {', '.join(KV_POLICIES)}")
        levels = ("critical", "error", "warning", "info", "debug")
        if self.log_level not in levels:
            raise ConfigError(f"invalid log_level {self.log_level!r}: must be one of {', '.join(levels)}")

    @property
    def policies(self) -> list[str]:
        return [p.strip() for p in self.kv_policies.split(",") if p.strip()]


def at_least(cfg, minimum: int, *names: str, optional: bool = False) -> None:
    """ConfigError unless each named field of cfg is an integer >= minimum (None allowed with `optional`)."""
    for name in names:
        v = getattr(cfg, name)
        if optional and v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            raise ConfigError(f"invalid {name.replace('_', '-')} {v!r}: must be an integer >= {minimum}")


@dataclass
class PplConfig:
    """Settings of `buddy eval ppl` (perplexity of a text file in fixed windows).

    text_file: the UTF-8 text file to score.
    window: tokens per window.
    max_windows: evenly spaced windows at most.
    batch_size: windows scored together.
    prefill: route each window's first N tokens as a prompt, the rest as decode (0: all prompt).
    allocation: `request` (every token the budget's k layers) or `token` (the decode part takes per-token
        depths from the depth head, the mean exact; prefill 0 then acts as 1).
    """

    text_file: str
    window: int = 512
    max_windows: int = 64
    batch_size: int = 4
    prefill: int = 0
    allocation: str = ALLOCATIONS[0]

    def __post_init__(self):
        _one_of(self, "allocation", ALLOCATIONS)
        at_least(self, 2, "window")
        at_least(self, 1, "max_windows", "batch_size")
        at_least(self, 0, "prefill")
        if self.prefill >= self.window:
            raise ConfigError(f"invalid prefill {self.prefill}: must be in [0, {self.window})")


@dataclass
class CodeEvalConfig:
    """Settings of `buddy eval code` (HumanEval pass@1).

    limit: first N of the 164 problems (None: all).
    max_new_tokens: tokens per completion at most.
    batch_size: completions decoded together (continuous batching: a finished one's place goes to the next prompt).
    timeout: seconds of wall clock and of CPU per program.
    weak_sandbox: run generated code without seccomp and Landlock where this machine lacks them.
    samples_out: write each completion and its result to this JSONL file.
    allocation: `request` (every generated token the budget's k layers) or `token` (each token its own depth
        from the depth head, each completion's mean exact).
    """

    limit: int | None = None
    max_new_tokens: int = 512
    batch_size: int = 8
    timeout: int = 10
    weak_sandbox: bool = False
    samples_out: str | None = None
    allocation: str = ALLOCATIONS[0]

    def __post_init__(self):
        _one_of(self, "allocation", ALLOCATIONS)
        at_least(self, 1, "limit", optional=True)
        at_least(self, 1, "max_new_tokens", "batch_size", "timeout")


@dataclass
class ZeroshotConfig:
    """Settings of `buddy eval zeroshot` (multiple-choice log-likelihood, LAMBADA, GSM8K).

    tasks: comma-separated task names (listed at the top of `buddy eval zeroshot --help`).
    mc_file: your own JSONL, one {"question", "choices", "gold"} per line.
    limit: first N documents per task (None: all).
    allocation: `request` or `token` (per-token depth, each answer's mean exact; generation, code and
        perplexity tasks: multiple choice scores given answers).
    """

    tasks: tuple[str, ...] = ()
    mc_file: str | None = None
    limit: int | None = None
    allocation: str = ALLOCATIONS[0]

    def __post_init__(self):
        _one_of(self, "allocation", ALLOCATIONS)
        at_least(self, 1, "limit", optional=True)
        if not self.tasks and not self.mc_file:
            raise ConfigError("give --tasks and/or --mc-file")


SWEEP_FRACTIONS = (0.5, 0.63, 0.77, 0.9)  # `buddy sweep`'s layer counts when --layers is not given


@dataclass
class SweepConfig:
    """Settings of `buddy sweep` (a resumable grid of methods x layer counts x tasks into JSONL).

    tasks: comma-separated task names (see `buddy eval zeroshot --help`), `ppl:<domain>` (perplexity on a domain of
        buddy/corpus.py), `kl:<domain>` (the same plus the mean KL to the dense model), `mc:FILE`.
    out: results JSONL (appended; finished cells are skipped).
    methods: dense and planner names, comma-separated.
    layers: layer counts: start:stop:step or a comma list, plus `auto` for the budget predictor; default
        0.5, 0.63, 0.77 and 0.9 of the model's layers, rounded (15,19,23,27 of SmolLM2's 30, 12,15,18,22 of
        Qwen2.5's 24).
    limit: first N documents per task (None: all).
    allocation: `request` (every token k layers) or `token` (per-token depth with each document's mean
        exact, from the depth head; perplexity and generation tasks, not multiple choice).
    """

    tasks: tuple[str, ...]
    out: str
    methods: tuple[str, ...] = ("dense", "static-greedy", "router")
    layers: str | None = None
    limit: int | None = None
    allocation: str = ALLOCATIONS[0]

    def __post_init__(self):
        _one_of(self, "allocation", ALLOCATIONS)
        at_least(self, 1, "limit", optional=True)
        if not self.tasks:
            raise ConfigError("give at least one task")


@dataclass
class CalibrateConfig:
    """Settings of `buddy calibrate` (Block Influence and greedy layer removal; buddy/calibration.py).

    data: calibration text: `mix` (the training mix of buddy/corpus.py, train split) or `sotu` (SOTU training years).
    windows: windows per domain for `mix`, windows in all for `sotu`.
    window: tokens per window.
    out: output JSON (default: the user cache, never the installed package).
    """

    data: str = CALIBRATION_DATA[0]
    windows: int = 2
    window: int = 256
    out: str | None = None

    def __post_init__(self):
        _one_of(self, "data", CALIBRATION_DATA)
        at_least(self, 1, "windows")
        at_least(self, 2, "window")


@dataclass
class ExportConfig:
    """Settings of `buddy export` (the depth comes from --budget/--layers).

    out: output directory (must not exist or be empty).
    format: `hf`: a plain checkpoint with only the k layers of a static plan; `vllm`: the whole model and its
        router for Buddy's vLLM plugin, with a per-request budget (docs/vllm.md).
    planner: hf: which static layer order (`static-greedy`, `static-bi`, or `router-prior`: the shipped
        router's prior).
    """

    out: str
    format: str = EXPORT_FORMATS[0]
    planner: str = EXPORT_PLANNERS[0]

    def __post_init__(self):
        _one_of(self, "format", EXPORT_FORMATS)
        _one_of(self, "planner", EXPORT_PLANNERS)
