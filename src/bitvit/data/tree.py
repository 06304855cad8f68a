"""A data source as a tree of files: a folder, or a tar archive (optionally gzipped) read lazily."""

from __future__ import annotations

import hashlib
import os
import tarfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from bitvit.data.base import BIN_FILES, IMAGE_EXTS, PY_FILES, DataError, _file_digest


@dataclass
class _Tree:
    """Files of a source, by POSIX relative path, plus its directories (to spot empty ones)."""

    label: str  # the source, for error messages
    files: dict[str, Callable[[], bytes]]
    dirs: set[str]
    archive: bool = False

    def where(self, rel: str) -> str:
        """How to name a member in messages: archive.tar.gz:member or folder/file."""
        return f"{self.label}:{rel}" if self.archive else str(Path(self.label) / rel)


def _open_source(path: Path) -> tuple[_Tree | None, str]:
    """Cache key of the source, and its tree for directories (archives are read lazily)."""
    if path.is_dir():
        files: dict[str, Callable[[], bytes]] = {}
        dirs: set[str] = set()
        h = hashlib.sha256()
        for root, dnames, fnames in os.walk(path):
            dnames.sort()
            rel_root = Path(root).relative_to(path).as_posix()
            if rel_root != ".":
                dirs.add(rel_root)
            for f in sorted(fnames):
                full = Path(root) / f
                rel = f if rel_root == "." else f"{rel_root}/{f}"
                st = full.stat()
                # Paths, sizes and mtimes: any edit, addition or removal changes the key.
                h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
                files[rel] = full.read_bytes
        return _Tree(str(path), files, dirs), "dir:" + h.hexdigest()
    if path.is_file():
        return None, "file:" + _file_digest(path, "sha256")
    raise DataError(f"data path {path} is neither a file nor a directory")


def _read_tar(path: Path) -> _Tree:
    """Read an archive in one streaming pass, keeping only the bytes of files we may need."""
    files: dict[str, Callable[[], bytes]] = {}
    dirs: set[str] = set()
    wanted = set(PY_FILES) | set(BIN_FILES)
    try:
        with tarfile.open(path, "r|*") as tar:
            for m in tar:
                name = PurePosixPath(m.name.lstrip("/"))
                parts = [p for p in name.parts if p not in (".", "")]
                if not parts or ".." in parts:
                    continue  # never happens in real data sets; ignore, we never extract
                rel = "/".join(parts)
                if m.isdir():
                    dirs.add(rel)
                    continue
                if not m.isfile():
                    continue
                for i in range(1, len(parts)):
                    dirs.add("/".join(parts[:i]))
                keep = parts[-1] in wanted or PurePosixPath(rel).suffix.lower() in IMAGE_EXTS
                data = tar.extractfile(m).read() if keep else b""  # type: ignore[union-attr]
                files[rel] = (lambda b=data: b)
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise DataError(f"{path} is not a readable tar archive (or is truncated): {e}") from None
    return _Tree(str(path), files, dirs, archive=True)


def _parent(rel: str) -> str:
    p = PurePosixPath(rel).parent.as_posix()
    return "" if p == "." else p


def _join(root: str, name: str) -> str:
    return f"{root}/{name}" if root else name


def _need(tree: _Tree, root: str, name: str) -> bytes:
    rel = _join(root, name)
    if rel not in tree.files:
        raise DataError(f"{tree.where(rel)} is missing (a CIFAR-10 folder needs "
                        f"{', '.join(BIN_FILES if name.endswith(('.bin', '.txt')) else PY_FILES)})")
    return tree.files[rel]()
