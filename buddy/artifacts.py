"""Shared plumbing for the files Buddy writes: atomic writes, trained-module artifacts with their metadata,
the commit that made them, and resumable training state.

    write_artifact(module, meta, out_dir, "router")      # router.safetensors + router.json, atomically
    atomic_write_text(path, text); save_state(path, state); state = load_state(path, device)
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from .errors import BuddyError


class StateFileError(BuddyError):
    """A training state file is unreadable (truncated or corrupt)."""


def atomic_write_text(path: Path, text: str) -> None:
    """Write text so that readers see the old file or the new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def atomic_save_tensors(tensors: dict, path: Path) -> None:
    """safetensors.save_file, atomically (readers see the old file or the new one)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")  # one per writer
    os.close(fd)
    try:
        save_file(tensors, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_artifact(module: nn.Module, meta, out_dir: Path, stem: str, skip: tuple[str, ...] = ()) -> None:
    """Write `<stem>.safetensors` (float32 weights) and `<stem>.json` (the metadata dataclass) atomically."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().contiguous().cpu() for k, v in module.state_dict().items() if k not in skip}
    tmp_w = out_dir / f"{stem}.safetensors.tmp"
    save_file(state, tmp_w)  # weights land last, so a reader never pairs new weights with old metadata
    atomic_write_text(out_dir / f"{stem}.json", json.dumps(asdict(meta), indent=1) + "\n")
    os.replace(tmp_w, out_dir / f"{stem}.safetensors")


def read_artifact(path: Path, stem: str, meta_cls, build, error, what: str, checksum: str | None = None,
                  n_layers: int | None = None, skip: tuple[str, ...] = ()):
    """(module, meta) from `<stem>.safetensors` and `<stem>.json` in `path`: `build(meta)` makes the module (a
    ValueError there means a corrupt file), `skip` names tensors that are not stored (as in write_artifact), and
    every problem (missing or corrupt files, another model's weights or layer count) is `error` naming the file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    wf, jf = path / f"{stem}.safetensors", path / f"{stem}.json"
    if not wf.is_file() or not jf.is_file():
        raise error(f"{path} is not a {what} directory (needs {wf.name} and {jf.name})")
    try:
        meta = meta_cls(**json.loads(jf.read_text()))
        module = build(meta)
    except (json.JSONDecodeError, TypeError, KeyError, ValueError) as e:
        raise error(f"{jf} is corrupt ({e})") from None
    if n_layers is not None and meta.n_layers != n_layers:
        raise error(f"{path}: the {what} was made for a {meta.n_layers}-layer model, this one has {n_layers}")
    if checksum is not None and meta.checksum != checksum:
        raise error(f"{path}: the {what} was made for model {meta.model!r} with other weights "
                    f"(checksum {meta.checksum[:12]} != {checksum[:12]})")
    try:
        missing, unexpected = module.load_state_dict(load_file(wf), strict=False)
    except (SafetensorError, RuntimeError, OSError) as e:
        raise error(f"{wf} is corrupt ({e})") from None
    missing = sorted(set(missing) - set(skip))
    if missing or unexpected:
        raise error(f"{wf} is corrupt (missing {missing}, unexpected {sorted(unexpected)})")
    return module, meta


def save_state(path: Path, state: dict) -> None:
    """Training state (tensors, numbers, lists, dicts) written atomically with torch.save."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_state(path: Path, device) -> dict:
    """Training state written by `save_state`; never unpickles code (weights_only=True)."""
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise StateFileError(f"{path} is unreadable ({type(e).__name__}: {str(e)[:120]}); "
                             "delete it to start the run again") from None


def check_resume(path: Path, saved: dict | None, now: dict) -> None:
    """Refuse to resume a run whose saved settings differ from the current ones (a ConfigError naming each);
    settings an older state file did not record are taken as unchanged."""
    from .config import ConfigError

    changed = {k: (saved[k], v) for k, v in now.items() if saved and k in saved and saved[k] != v}
    if changed:
        raise ConfigError(f"{path} was written with other settings: " + ", ".join(
            f"{k} {old!r} (now {new!r})" for k, (old, new) in changed.items())
            + "; resume with the same ones, or use another --out")


def git_commit(here: Path | None = None) -> str:
    """HEAD of the checkout Buddy runs from (or of `here`), with "+dirty" when its tracked files have
    uncommitted changes (then the commit alone does not reproduce an artifact); "" outside a checkout."""
    here = here or Path(__file__).parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=here).stdout.strip()
        if head and subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                   text=True, timeout=5, cwd=here).stdout.strip():
            head += "+dirty"
        return head
    except (OSError, subprocess.SubprocessError):
        return ""
