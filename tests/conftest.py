"""Shared fixtures: tiny random Llama / Qwen2 / Qwen3 / Mistral backbones built in the test (no weights, no network)."""

import pytest
import torch

from buddy.backbone import Backbone

ARCHS = ("llama", "qwen2", "qwen3", "mistral")


def tiny_hf(model_type: str, n_layers: int = 6, seed: int = 0, **sizes):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    extra = {"head_dim": 16} if model_type == "qwen3" else {}
    shape = {"hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 4, "num_key_value_heads": 2, **sizes}
    cfg = AutoConfig.for_model(
        model_type, vocab_size=97, num_hidden_layers=n_layers, max_position_embeddings=256, tie_word_embeddings=False,
        **shape, **extra,
    )
    if model_type == "qwen2":
        cfg.attention_bias = True  # Qwen2 has qkv bias; keep it explicit
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=torch.float32).eval()
    with torch.no_grad():  # random init is small; scale up so layers differ visibly
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def tiny_backbone(model_type: str = "llama", n_layers: int = 6, seed: int = 0) -> Backbone:
    return Backbone(tiny_hf(model_type, n_layers, seed), tokenizer=None, name=f"tiny-{model_type}")


def random_plans(B: int, S: int, L: int, k: int, seed: int = 0) -> torch.Tensor:
    """Random plans with exactly k layers per token, layer 0 and L-1 always on."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(B, S, L - 2, generator=g)
    from buddy.planner import topk_plan

    return topk_plan(scores, torch.full((B,), k))


def worse_than_static_on_held_out(bb, limit: int = 16) -> list[tuple[str, int, float]]:
    """(domain, k, router / best static perplexity) for every held-out domain and every k from 0.5L to 0.9L where the
    shipped router's perplexity exceeds the better static plan's (beyond float32 rounding, `no_worse`), on the test
    windows `buddy sweep --limit` reads."""
    from buddy.api import make_planner
    from buddy.corpus import HELDOUT_DOMAINS
    from buddy.engine import Engine
    from buddy.eval.stats import no_worse
    from buddy.eval.sweep import run_task

    engines = {m: Engine(bb, make_planner(m, bb, "fill"), "fill") for m in ("router", "static-bi", "static-greedy")}
    worse = []
    for domain in HELDOUT_DOMAINS:
        for k in range(round(0.5 * bb.n_layers), round(0.9 * bb.n_layers) + 1):
            ppl = {m: run_task(e, f"ppl:{domain}", k, limit=limit)["ppl"] for m, e in engines.items()}
            best = min(ppl["static-bi"], ppl["static-greedy"])
            if not no_worse(ppl["router"], best):
                worse.append((domain, k, round(ppl["router"] / best, 4)))
    return worse


@pytest.fixture(params=ARCHS)
def arch(request):
    return request.param


def save_tiny_checkpoint(path, model_type: str = "llama", n_layers: int = 6, **sizes):
    """A tiny local Hugging Face checkpoint directory (random weights, a word-level tokenizer)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "</s>"] + [f"w{i}" for i in range(95)]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.decoder = decoders.WordPiece(prefix="##")
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", eos_token="</s>")
    model = tiny_hf(model_type, n_layers, **sizes)
    model.config.eos_token_id = 1
    model.generation_config.eos_token_id = 1
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny-llama"))


KEY = "test-key"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def server():
    """`buddy serve` on the embedded model (float32, an API key) on a free loopback port, for the session."""
    import subprocess
    import sys
    import time

    import httpx2 as httpx

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "buddy", "serve", "--dtype", "float32", "--device", "cpu",
                             "--port", str(port), "--api-key", KEY, "--max-batch", "32", "--max-tokens-limit", "512"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            pytest.fail("server exited: " + proc.stdout.read())
        time.sleep(0.1)
    else:
        proc.kill()
        pytest.fail("server did not start")
    yield url
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="session")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0)
