"""Offline layer importance on calibration text, the static baselines, and the router's prior.

- Block Influence (ShortGPT): BI_i = 1 - mean cos(h_in, h_out) of layer i; higher = more important.
- Greedy removal (SLEB-style): repeatedly remove the layer whose removal raises calibration perplexity
  least; the reverse removal order is the importance order.

    buddy calibrate --model smollm2 --data mix   # writes to the user cache (see `user_calibration_path`)
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import torch
from tqdm import tqdm

from .artifacts import atomic_write_text
from .config import CALIBRATION_DATA, DEFAULT_KV_POLICY, cache_dir
from .errors import BuddyError
from .eval.ppl import evaluate_windows
from .planner import GivenPlanner

PACKAGED = Path(__file__).parent / "data" / "calibration"


class CalibrationError(BuddyError):
    """Missing calibration, or calibration made for another model."""


@torch.inference_mode()
def block_influence(bb, windows: torch.Tensor, batch_size: int = 4) -> list[float]:
    """1 - mean cosine(h_in, h_out) per layer over all calibration tokens, at full depth."""
    from .engine import prologue
    from .kv_cache import KVCache

    L = bb.n_layers
    sums = torch.zeros(L, dtype=torch.float64)
    count = 0

    def add(i, h_in, h_out):
        sums[i] += torch.nn.functional.cosine_similarity(h_in.float(), h_out.float(), dim=-1).sum().double()

    for s in range(0, windows.shape[0], batch_size):
        ids = windows[s:s + batch_size].to(bb.device)
        cache = KVCache(bb.shapes, ids.shape[0], ids.shape[1], DEFAULT_KV_POLICY, bb.dtype, bb.device)
        h, rope = prologue(bb, ids, cache)  # the engine's own embed -> rotary -> layer 0
        add(0, bb.embed(ids), h)  # layer 0's input is the embedding
        for i in range(1, L):
            out = bb.layer(i, h, cache.mask(i), rope, cache)
            add(i, h, out)
            h = out
        cache.end()
        count += ids.numel()
    return (1 - sums / count).tolist()


def greedy_removal(bb, windows: torch.Tensor, kv_policy: str = DEFAULT_KV_POLICY, batch_size: int = 4,
                   progress: bool = True) -> tuple[list[int], list[float], float]:
    """(removal order of the intermediate layers, ppl after each removal, dense ppl)."""
    from .engine import Engine

    L = bb.n_layers
    kept = list(range(L))

    def ppl(layers):
        eng = Engine(bb, GivenPlanner(layers, L), kv_policy)
        return evaluate_windows(eng, windows, layers=len(layers), batch_size=batch_size).ppl

    dense = ppl(kept)
    removed, ppls = [], []
    n_evals = (L - 2) * (L - 1) // 2
    with tqdm(total=n_evals, desc="greedy removal", unit="eval", disable=not progress) as bar:
        while len(kept) > 2:
            best = None
            for i in kept[1:-1]:
                p = ppl([j for j in kept if j != i])
                bar.update(1)
                if best is None or p < best[1]:
                    best = (i, p)
            kept.remove(best[0])
            removed.append(best[0])
            ppls.append(best[1])
            bar.set_postfix(removed=best[0], ppl=f"{best[1]:.2f}")
    return removed, ppls, dense


def calibrate(bb, windows: torch.Tensor, command: str, data: str, progress: bool = True) -> dict:
    bi = block_influence(bb, windows)
    L = bb.n_layers
    removed, ppls, dense = greedy_removal(bb, windows, progress=progress)
    return {
        "model": bb.name,
        "checksum": bb.checksum,
        "n_layers": L,
        "block_influence": bi,
        "orders": {
            "static-bi": sorted(range(1, L - 1), key=lambda i: -bi[i]),
            "static-greedy": list(reversed(removed)),
        },
        "greedy_removed": removed,
        "greedy_ppl": ppls,
        "dense_ppl": dense,
        "data": data,
        "command": command,
        "dtype": str(bb.dtype).replace("torch.", ""),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }




def user_calibration_path(bb, data: str = CALIBRATION_DATA[0]) -> Path:
    """Where `buddy calibrate` writes by default: the user's cache, keyed by the weights' checksum."""
    return cache_dir() / "calibration" / f"{bb.name}-{bb.checksum[:16]}-{data}.json"


def calibration_path(bb, calibration: str | None = None) -> Path:
    """The calibration file to use. `calibration`: `mix` or `sotu` (the shipped calibration of that text
    for a shipped model, else the user's own from `buddy calibrate --data ...`), or a JSON file path.
    None: the shipped `mix` calibration, else the shipped `sotu` one, else the user's `mix`. The shipped files are never written; a user calibration is read only when no shipped
    one exists for the model or when its path is given."""
    if calibration is None:  # the first shipped calibration in CALIBRATION_DATA order, else the user's `mix`
        shipped = [PACKAGED / f"{bb.name}-{d}.json" for d in CALIBRATION_DATA]
        return next((p for p in shipped if p.is_file()), user_calibration_path(bb, CALIBRATION_DATA[0]))
    if calibration not in CALIBRATION_DATA:
        return Path(calibration)
    packaged = PACKAGED / f"{bb.name}-{calibration}.json"
    return packaged if packaged.is_file() else user_calibration_path(bb, calibration)


def calibration_label(bb, calibration: str | None = None) -> str:
    """`mix` or `sotu` for the calibration `calibration_path` picks, or the path of a user's JSON file."""
    if calibration is None:
        return calibration_path(bb).stem.rsplit("-", 1)[-1]
    return calibration if calibration in CALIBRATION_DATA else str(calibration_path(bb, calibration))


def save_calibration(result: dict, path: Path) -> None:
    atomic_write_text(path, json.dumps(result, indent=1) + "\n")


def load_calibration(bb, calibration: str | None = None) -> dict:
    path = calibration_path(bb, calibration)
    if not path.is_file():
        data = calibration if calibration in CALIBRATION_DATA else None
        hint = (f"run `buddy calibrate --model {bb.name} --data {data}` first" if data or calibration is None
                else "give a calibration JSON written by `buddy calibrate`")
        raise CalibrationError(f"no layer calibration {str(path)!r} for model {bb.name!r}: {hint}")
    try:
        cal = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CalibrationError(f"{path} is not valid JSON ({e}); rerun `buddy calibrate --model {bb.name}`") from None
    if not isinstance(cal, dict) or cal.get("n_layers") != bb.n_layers or cal.get("checksum") != bb.checksum:
        raise CalibrationError(f"{path} was calibrated for another model (checksum or layer count differs)")
    return cal
