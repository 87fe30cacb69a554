"""Where data lives: a configurable data root with the hub (`datasets`) as the online fallback.

Resolution order for the data root: the `paths.data_root` config (also set by BENCH_DATA_ROOT), then
`../shared/data` beside the current directory or beside the source checkout. A root the user names must
exist: it is never silently replaced by the fallback. Files are only read from there, never copied into
the repo.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from bench.errors import DataCorrupt, DataMissing

if TYPE_CHECKING:
    import torch

_SOURCE_ROOT = Path(__file__).resolve().parents[1]


def data_root(configured: str | None = None) -> Path | None:
    for name, given in (("paths.data_root", configured), ("BENCH_DATA_ROOT", os.environ.get("BENCH_DATA_ROOT"))):
        if given:
            if not Path(given).is_dir():
                raise DataMissing(f"data root '{given}' ({name}) is not a directory",
                                  f"fix {name}, or unset it to use ../shared/data")
            return Path(given).resolve()
    for c in (Path.cwd().parent / "shared" / "data", _SOURCE_ROOT.parent / "shared" / "data"):
        if c.is_dir():
            return c.resolve()
    return None


def local_file(relpath: str, configured_root: str | None = None) -> Path | None:
    root = data_root(configured_root)
    if root is not None and (root / relpath).is_file():
        return root / relpath
    return None


def hub_offline() -> bool:
    return os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1"


def missing(relpath: str, configured_root: str | None, hub: str | None = None) -> DataMissing:
    root = data_root(configured_root)
    where = f"under {root}" if root else "(no data root found)"
    online = f", or go online so `datasets` can load {hub}" if hub else ""
    return DataMissing(
        f"data file '{relpath}' not found {where}",
        f"put it there or set paths.data_root=... / BENCH_DATA_ROOT{online}",
    )


def wikitext2_rows(split: str, configured_root: str | None = None, hub_path: str = "wikitext",
                   hub_name: str = "wikitext-2-raw-v1") -> list[str]:
    """WikiText-2 raw rows exactly as the HF `wikitext` dataset gives them (lines; blank lines as "")."""
    fname = {"test": "wiki.test.raw", "validation": "wiki.valid.raw", "train": "wiki.train.raw"}[split]
    rel = f"wikitext-2-raw-v1/{fname}"
    path = local_file(rel, configured_root)
    if path is not None:
        return [line + "\n" if line.strip() else "" for line in read_text(path).split("\n")[:-1]]
    if hub_offline():
        raise missing(rel, configured_root, hub=f"{hub_path}/{hub_name}")
    return hub_rows(hub_path, hub_name, split)


def read_text(path: Path) -> str:
    """A local text data file, or one line saying it is not UTF-8 text (truncated, binary, wrong file)."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataCorrupt(f"data file '{path}' is not UTF-8 text (byte {e.start})",
                          "restore it from its source (see SOURCE.md beside it)") from None


def hub_rows(path: str, name: str | None, split: str, field: str = "text") -> list[str]:
    """The ordinary `datasets` path (a hub id, or a local dataset directory/script)."""
    import datasets

    try:
        ds = datasets.load_dataset(path, name, split=split)
    except Exception as e:  # network, missing split, ...
        raise DataMissing(f"could not load dataset {path}/{name} split {split}: {type(e).__name__}",
                          "check the name or set paths.data_root to local files") from e
    return list(ds[field])


def cache_dir() -> Path:
    """Derived data (token ids, lm-eval JSONL documents) under the results directory, never in the repo."""
    return Path(os.environ.get("BENCH_RESULTS", "results")) / "data_cache"


def _tokenizer_fingerprint(tokenizer) -> str | None:
    """A content hash of a fast tokenizer: its serialized pipeline plus what it returns for a probe (which also
    captures BOS/EOS handling done outside the pipeline). None for tokenizers without a serialized form."""
    import hashlib

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    h.update(backend.to_str().encode())
    h.update(repr(tokenizer("probe text\n\nx").input_ids).encode())
    return h.hexdigest()


def token_ids(tokenizer, text: str) -> "torch.Tensor":
    """`tokenizer(text).input_ids` as a (1, n) tensor, cached under `cache_dir()/tokens` by the text's and the
    tokenizer's content hashes: WikiText-2 (300k tokens) costs seconds to tokenize, in every run and sweep cell."""
    import hashlib

    import numpy as np
    import torch

    from bench.cache import atomic_write

    fingerprint = _tokenizer_fingerprint(tokenizer)
    if fingerprint is None:
        return tokenizer(text, return_tensors="pt").input_ids
    key = hashlib.sha256((fingerprint + hashlib.sha256(text.encode()).hexdigest()).encode()).hexdigest()[:32]
    path = cache_dir() / "tokens" / f"{key}.npy"
    if path.is_file():
        try:
            return torch.from_numpy(np.load(path, allow_pickle=False)).unsqueeze(0)
        except (OSError, ValueError):
            path.unlink(missing_ok=True)  # a damaged entry is rebuilt below
    ids = tokenizer(text, return_tensors="pt").input_ids

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: np.save would append ".npy" to a path
            np.save(f, ids[0].numpy())

    try:
        atomic_write(path, write)
    except OSError:
        pass  # a read-only results directory only costs the next run the tokenization again
    return ids
