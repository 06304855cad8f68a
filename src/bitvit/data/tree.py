"""A data source as a tree of files: a folder, or a tar archive (optionally gzipped) read lazily."""

from __future__ import annotations

import hashlib
import os
import tarfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from bitvit.data.base import (
    BIN_FILES,
    IMAGE_EXTS,
    PY_FILES,
    DataError,
    _file_digest,
    file_limit_hint,
    max_file_bytes,
)
from bitvit.files import FileRefused, read_limited
from bitvit.system import host_memory, human_bytes


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
                try:
                    st = full.stat()  # through symlinks: what is read is what they point to
                    mark = f"{st.st_size}\0{st.st_mtime_ns}"
                except OSError:  # a dangling symlink: an error only if it is ever read
                    mark = "?"
                # Paths, sizes and mtimes: any edit, addition or removal changes the key.
                h.update(f"{rel}\0{mark}\n".encode())
                files[rel] = _file_reader(full)
        return _Tree(str(path), files, dirs), "dir:" + h.hexdigest()
    if path.is_file():
        return None, "file:" + _file_digest(path, "sha256")
    raise DataError(f"data path {path} is neither a file nor a directory")


def _what(name: str) -> str:
    """What a file of a data set should be, for messages that refuse it."""
    return "PNG, JPEG or other image" if PurePosixPath(name).suffix.lower() in IMAGE_EXTS else \
        "CIFAR-10 batch file"


def _file_reader(path: Path) -> Callable[[], bytes]:
    """Reads ``path`` when called: a regular file (symlinks followed) of at most
    `max_file_bytes`. A FIFO (which would hang), a device (/dev/zero: endless) or a larger file
    is a one-line DataError naming it, unread, as an unreadable image is."""
    def read() -> bytes:
        try:
            return read_limited(path, _what(path.name), max_file_bytes())
        except FileRefused as e:
            # Only a refusal by size has a limit to raise.
            hint = file_limit_hint() if str(e).endswith(" bytes") else ""
            raise DataError(f"{e}{hint}") from None
        except OSError as e:
            raise DataError(f"{path}: cannot be read ({e.strerror or e})") from None

    return read


def _member_bytes(tar: tarfile.TarFile, m: tarfile.TarInfo, where: str, limit: int) -> bytes:
    """A member's bytes, refused from its header's size over ``limit`` (a gzip bomb of zeros
    would otherwise be inflated whole), and read no further than the limit all the same."""
    refusal = f"bytes; a {_what(m.name)} is at most {limit:,} bytes{file_limit_hint()}"
    if m.size > limit:
        raise DataError(f"{where}: {m.size:,} {refusal}; not read")
    f = tar.extractfile(m)
    data = f.read(limit + 1) if f is not None else b""
    if len(data) > limit:
        raise DataError(f"{where}: more than {limit:,} {refusal}; read no further")
    return data


def _archive_budget() -> tuple[int, str] | None:
    """The most bytes an archive's kept members may hold in memory: half of what is available
    (a gzip of many zero-filled members, each within the file limit, inflates without bound)."""
    available = host_memory()
    return None if available is None else (available[0] // 2, available[1])


# tarfile reads a pax or GNU long-name header whole before bitvit sees its member: real ones
# hold a few hundred bytes, but one claiming 8 GB of zeros gzips into 8 MB.
MAX_TAR_HEADER_BYTES = 1 << 20


class _HeaderTooLarge(Exception):
    """An extended tar header over `MAX_TAR_HEADER_BYTES` (`_read_tar` names the archive)."""


class _BoundedTarInfo(tarfile.TarInfo):
    """A TarInfo that refuses an extended header over `MAX_TAR_HEADER_BYTES` before reading it."""

    def _bounded(self, kind: str) -> None:
        if self.size > MAX_TAR_HEADER_BYTES:
            raise _HeaderTooLarge(f"a {kind} header of {human_bytes(self.size)}, over the "
                                  f"{human_bytes(MAX_TAR_HEADER_BYTES)} any real archive needs")

    def _proc_pax(self, tarfile: tarfile.TarFile) -> tarfile.TarInfo:  # type: ignore[override]
        self._bounded("pax")
        return super()._proc_pax(tarfile)  # type: ignore[misc]

    def _proc_gnulong(self, tarfile: tarfile.TarFile) -> tarfile.TarInfo:  # type: ignore[override]
        self._bounded("GNU long-name")
        return super()._proc_gnulong(tarfile)  # type: ignore[misc]


def _read_tar(path: Path) -> _Tree:
    """Read an archive in one streaming pass, keeping only the bytes of files we may need."""
    files: dict[str, Callable[[], bytes]] = {}
    dirs: set[str] = set()
    wanted = set(PY_FILES) | set(BIN_FILES)
    limit, held, budget = max_file_bytes(), 0, _archive_budget()
    try:
        with tarfile.open(path, "r|*", tarinfo=_BoundedTarInfo) as tar:
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
                data = _member_bytes(tar, m, f"{path}:{rel}", limit) if keep else b""
                held += len(data)
                if budget is not None and held > budget[0]:
                    raise DataError(
                        f"{path}: its images and batches inflate past {human_bytes(budget[0])}, "
                        f"half the memory available ({budget[1]}); extract the archive and give "
                        "its folder (read one file at a time)")
                files[rel] = (lambda b=data: b)
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise DataError(f"{path} is not a readable tar archive (or is truncated): {e}") from None
    except _HeaderTooLarge as e:
        raise DataError(f"{path}: {e}; refused unread") from None
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
