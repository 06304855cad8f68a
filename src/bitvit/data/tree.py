"""A data source as a tree of files: a folder, or a tar archive (optionally gzipped) read lazily."""

from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import lzma
import os
import re
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
        # Symlinked folders are followed, as symlinked files are; one that leads back to a
        # folder it is inside would be walked forever.
        above = {str(path): frozenset({os.path.realpath(path)})}
        for root, dnames, fnames in os.walk(path, followlinks=True):
            dnames.sort()
            for d in dnames:
                real = os.path.realpath(os.path.join(root, d))
                if real in above[root]:
                    raise DataError(f"{os.path.join(root, d)}: a link to a folder it is inside "
                                    f"({real}); a data set is a tree, not a loop")
                above[os.path.join(root, d)] = above[root] | {real}
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
                h.update(f"{rel}\0{mark}\n".encode("utf-8", "surrogateescape"))
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


# Deflate cannot inflate more than 1032-fold; bzip2 and xz can inflate a few kB to terabytes,
# all of it decompressed (and thrown away) even for members bitvit skips. No image data
# compresses past deflate's ceiling, so the stream is refused beyond it (and beyond a floor for
# small archives, whose tar padding compresses well).
MAX_INFLATION = 1032
MIN_INFLATED_BYTES = 64 << 20
# What one member costs held as a name in memory besides its name (the dict entry, the str).
MEMBER_OVERHEAD = 256
MAX_LINK_HOPS = 8
# The streams' first bytes: gzip's magic and deflate; bzip2's magic, block size and the first
# block's (or an empty stream's end) marker, since a plain tar may begin with a file named BZh...
_DECOMPRESSORS = {re.compile(rb"\x1f\x8b\x08"): gzip.open,
                  re.compile(rb"BZh[1-9](1AY&SY|\x17rE8P\x90)"): bz2.open,
                  re.compile(rb"\xfd7zXZ\x00"): lzma.open}


class _TarRefused(Exception):
    """What tarfile must not read (`_read_tar` names the archive)."""


class _BoundedTarInfo(tarfile.TarInfo):
    """A TarInfo that refuses an extended header over `MAX_TAR_HEADER_BYTES` before reading it,
    and sparse members, whose maps run to any length (no data set has them)."""

    def _bounded(self, kind: str) -> None:
        if self.size > MAX_TAR_HEADER_BYTES:
            raise _TarRefused(f"a {kind} header of {human_bytes(self.size)}, over the "
                              f"{human_bytes(MAX_TAR_HEADER_BYTES)} any real archive needs")

    def _proc_pax(self, tarfile: tarfile.TarFile) -> tarfile.TarInfo:  # type: ignore[override]
        self._bounded("pax")
        return super()._proc_pax(tarfile)  # type: ignore[misc]

    def _proc_gnulong(self, tarfile: tarfile.TarFile) -> tarfile.TarInfo:  # type: ignore[override]
        self._bounded("GNU long-name")
        return super()._proc_gnulong(tarfile)  # type: ignore[misc]

    def _proc_sparse(self, tarfile: tarfile.TarFile) -> tarfile.TarInfo:  # type: ignore[override]
        raise _TarRefused(f"a sparse member ({self.name[:80]}), which no data set needs")

    def _proc_gnusparse_10(self, next: tarfile.TarInfo, pax_headers: dict[str, str],
                           tarfile: tarfile.TarFile) -> None:
        raise _TarRefused(f"a sparse member ({next.name[:80]}), which no data set needs")


class _Inflating(io.RawIOBase):
    """A decompressing reader that refuses to give more than ``limit`` bytes."""

    def __init__(self, f: io.BufferedIOBase, limit: int, what: str) -> None:
        self.f, self.limit, self.what, self.total = f, limit, what, 0

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        n = self.f.readinto(b)
        self.total += n
        if self.total > self.limit:
            raise _TarRefused(f"{self.what} inflates past {human_bytes(self.limit)}, more "
                              f"than {MAX_INFLATION}x its size, which no image data compresses "
                              "to (a decompression bomb)")
        return n

    def close(self) -> None:
        self.f.close()
        super().close()


def _tar_stream(path: Path) -> io.RawIOBase | io.BufferedReader:
    """The archive's tar bytes: decompressed (gzip, bzip2, xz) through a reader of bounded
    buffers and total, where tarfile's own stream mode inflates a chunk without bound."""
    with open(path, "rb") as f:
        magic = f.read(10)
    for prefix, opener in _DECOMPRESSORS.items():
        if prefix.match(magic):
            size = path.stat().st_size
            return _Inflating(opener(path, "rb"), max(MIN_INFLATED_BYTES, MAX_INFLATION * size),
                              f"a {size:,}-byte archive")
    return open(path, "rb")  # noqa: SIM115 - closed by _read_tar


def _link_target(rel: str, m: tarfile.TarInfo) -> str | None:
    """A link member's target as a path in the archive; None if it leaves the archive."""
    start = [] if m.islnk() else rel.split("/")[:-1]  # a hard link names a path from the root
    if m.issym() and m.linkname.startswith("/"):
        return None
    parts = list(start)
    for p in m.linkname.split("/"):
        if p in ("", "."):
            continue
        if p == "..":
            if not parts:
                return None
            parts.pop()
        else:
            parts.append(p)
    return "/".join(parts) or None


def _read_tar(path: Path) -> _Tree:
    """Read an archive in one streaming pass, keeping only the bytes of files we may need.
    Everything held (those bytes, and every member's name) counts against `_archive_budget`."""
    files: dict[str, Callable[[], bytes]] = {}
    dirs: set[str] = set()
    links: dict[str, tuple[str | None, str]] = {}  # link -> (target in the archive, as written)
    wanted = set(PY_FILES) | set(BIN_FILES)
    limit, held, budget = max_file_bytes(), 0, _archive_budget()

    def hold(n: int) -> None:
        nonlocal held
        held += n
        if budget is not None and held > budget[0]:
            raise DataError(
                f"{path}: its images and batches inflate past {human_bytes(budget[0])}, "
                f"half the memory available ({budget[1]}); extract the archive and give "
                "its folder (read one file at a time)")

    try:
        with _tar_stream(path) as raw, tarfile.open(fileobj=raw, mode="r|",
                                                    tarinfo=_BoundedTarInfo) as tar:
            while (m := tar.next()) is not None:
                tar.members.clear()  # stream mode would keep every header read
                name = PurePosixPath(m.name.lstrip("/"))
                parts = [p for p in name.parts if p not in (".", "")]
                if not parts or ".." in parts:
                    continue  # never happens in real data sets; ignore, we never extract
                rel = "/".join(parts)
                hold(len(rel) + MEMBER_OVERHEAD)
                if m.isdir():
                    dirs.add(rel)
                    continue
                if not (m.isfile() or m.islnk() or m.issym()):
                    continue
                for i in range(1, len(parts)):
                    dirs.add("/".join(parts[:i]))
                if not m.isfile():
                    links[rel] = (_link_target(rel, m), m.linkname[:200])
                    continue
                keep = parts[-1] in wanted or PurePosixPath(rel).suffix.lower() in IMAGE_EXTS
                if not keep:  # never read: no image's or batch's name (a link's may be)
                    files[rel] = _unread(f"{path}:{rel}")
                    continue
                data = _member_bytes(tar, m, f"{path}:{rel}", limit)
                hold(len(data))
                files[rel] = (lambda b=data: b)
    except DataError:
        raise
    except _TarRefused as e:
        raise DataError(f"{path}: {e}; refused unread") from None
    except (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, OSError, ValueError,
            IndexError) as e:  # ValueError, IndexError: tarfile's on some crafted headers
        raise DataError(f"{path} is not a readable tar archive (or is truncated): "
                        f"{str(e)[:200]}") from None
    _resolve_links(path, files, dirs, links, hold)
    return _Tree(str(path), files, dirs, archive=True)


def _resolve_links(path: Path, files: dict[str, Callable[[], bytes]], dirs: set[str],
                   links: dict[str, tuple[str | None, str]], hold: Callable[[int], None]) -> None:
    """Links read as what they point to, as in an extracted folder: a file, or a folder's files
    (one level: links inside a linked folder are not followed again). A link that leaves the
    archive or points nowhere is an error when it is read."""
    for rel, (target, written) in links.items():
        for _ in range(MAX_LINK_HOPS):  # a link to a link
            if target not in links:
                break
            target = links[target][0]
        if target in files:
            files[rel] = files[target]
        elif target in dirs:
            dirs.add(rel)
            for f in [f for f in files if f.startswith(target + "/")]:
                alias = rel + f[len(target):]
                hold(len(alias) + MEMBER_OVERHEAD)
                files[alias] = files[f]
                dirs.update(_parent(alias).rsplit("/", k)[0]
                            for k in range(_parent(alias).count("/") + 1))
        else:
            files[rel] = _unresolved(f"{path}:{rel}", written)


def _unread(where: str) -> Callable[[], bytes]:
    def read() -> bytes:
        raise DataError(f"{where}: not kept from the archive (its name is no image's or CIFAR-10 "
                        "batch's); a link with an image's name that points to it cannot be read")

    return read


def _unresolved(where: str, written: str) -> Callable[[], bytes]:
    def read() -> bytes:
        raise DataError(f"{where}: a link to {written}, which the archive does not hold")

    return read


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
