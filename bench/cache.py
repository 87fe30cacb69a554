"""Compressed-model artifacts: content-hash keyed safetensors files, written atomically, verified on read.

Layout: `<root>/<key>.safetensors` plus `<key>.sha256` (hash of the file's bytes). A file is written to a
temporary name and renamed; the hash sidecar is written last, so a crash mid-write leaves no entry that a
later run would trust. Loading goes through safetensors only (no pickle).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from bench.errors import ArtifactCorrupt, ResourceError


def content_key(*parts) -> str:
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:24]


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _umask_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write(path: Path, write) -> None:
    """`write(tmp_path)` fills a temporary file beside `path`, which is then renamed over `path`: readers
    see the old file or the complete new one, never a partial one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, _umask_mode())  # mkstemp creates 0600; the final file gets ordinary permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    atomic_write(path, write)


class ArtifactStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def paths(self, key: str) -> tuple[Path, Path]:
        return self.root / f"{key}.safetensors", self.root / f"{key}.sha256"

    def has(self, key: str) -> bool:
        f, h = self.paths(key)
        return f.is_file() and h.is_file()

    def save(self, key: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
        f, h = self.paths(key)
        try:
            atomic_write(f, lambda tmp: save_file(tensors, tmp, metadata=metadata))
            atomic_write_bytes(h, file_sha256(f).encode())  # written last: its presence marks a complete entry
        except OSError as e:
            self.discard(key)  # a file without its hash is never trusted; do not leave it taking space either
            raise ResourceError(f"cannot write artifact under {self.root}: {e.strerror or e}",
                                "free disk space or set paths.results to a writable directory") from e
        return f

    def load(self, key: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        f, h = self.paths(key)
        if not self.has(key):
            raise ArtifactCorrupt(f"artifact {key} is incomplete", "it will be rebuilt; delete it to force that")
        if file_sha256(f) != h.read_text().strip():
            raise ArtifactCorrupt(f"artifact {f} fails its sha256 check", f"delete {f} and re-run to rebuild it")
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(f), framework="pt") as sf:
                metadata = sf.metadata() or {}
            return load_file(str(f)), metadata
        except SafetensorError as e:  # hash matches but not a safetensors file (e.g. written by something else)
            raise ArtifactCorrupt(f"artifact {f} is not a readable safetensors file ({e})",
                                  f"delete {f} and re-run to rebuild it") from None

    def discard(self, key: str) -> None:
        for p in self.paths(key):
            p.unlink(missing_ok=True)
