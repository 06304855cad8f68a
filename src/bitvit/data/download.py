"""Where the data is: --data / data.path, $BITVIT_DATA, the shared default, or a verified
download of the official CIFAR-10 tarball into the cache folder."""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import logging
import os
import re
import shutil
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from bitvit.data.base import DEFAULT_DATA, OFFICIAL_MD5, OFFICIAL_URL, DataError, _file_digest
from bitvit.files import resolve_cache_dir

log = logging.getLogger("bitvit.data")

# The official tarball is 170,498,071 bytes: a mirror, or another file named by its MD5, has room
# to spare, but an endless stream stops here instead of filling the disk before the MD5 check.
MAX_DOWNLOAD_BYTES = 1 << 30
# Each read may wait 60 s; a server that trickles a byte a minute would never end without a
# deadline for the whole: an hour is 170 MB at 47 kB/s.
MAX_DOWNLOAD_SECONDS = 3600


def find_data(path: str | None) -> Path:
    """Resolve the data location: ``path``, then $BITVIT_DATA, then the shared default."""
    if path is not None and str(path) != "":
        p = Path(path).expanduser()
        if not p.exists():
            raise DataError(f"data path {path} does not exist (from --data / data.path)")
        return p
    env = os.environ.get("BITVIT_DATA")
    if env:
        p = Path(env).expanduser()
        if not p.exists():
            raise DataError(f"BITVIT_DATA={env} does not exist")
        return p
    if DEFAULT_DATA.exists():
        return DEFAULT_DATA
    raise DataError("no data found: pass --data PATH (CIFAR-10 tarball or folder, or an image "
                    "folder with train/ and test/), set BITVIT_DATA, or pass --download")


def download_cifar10(cache_dir: str | os.PathLike[str] | None, url: str | None = None,
                     md5: str | None = None) -> Path:
    """Fetch the CIFAR-10 python tarball into ``cache_dir`` and return its path.

    The file is streamed to a temp file and renamed into place only after its MD5 matches, so a
    truncated or tampered download is never used. An existing file with the right MD5 is reused.
    """
    url = url or os.environ.get("BITVIT_CIFAR10_URL") or OFFICIAL_URL
    md5 = (md5 or os.environ.get("BITVIT_CIFAR10_MD5") or OFFICIAL_MD5).lower()
    if not re.fullmatch("[0-9a-f]{32}", md5):  # before 170 MB are fetched, not after
        raise DataError(f"MD5 {md5[:80]!r} (data.download_md5 / $BITVIT_CIFAR10_MD5): expected "
                        "32 hexadecimal digits")
    folder = resolve_cache_dir(cache_dir)
    folder.mkdir(parents=True, exist_ok=True)
    _remove_stale_downloads(folder)
    dest = folder / "cifar-10-python.tar.gz"
    if dest.exists():
        if _file_digest(dest, "md5") == md5:
            log.info("using downloaded %s (MD5 ok)", dest)
            return dest
        log.warning("%s has the wrong MD5; downloading it again", dest)

    fd, tmp_name = tempfile.mkstemp(dir=folder, prefix=".download-", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        h = hashlib.md5()
        got = 0
        log.info("downloading %s", url)
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as resp:
            expected = resp.headers.get("Content-Length")
            _check_room(url, folder, None if expected is None else int(expected))
            start = time.monotonic()
            while chunk := resp.read1(1 << 20):  # what one network read gives: the deadline
                got += len(chunk)                # is checked however slowly bytes come
                if got > MAX_DOWNLOAD_BYTES:
                    raise DataError(f"download of {url} passed {MAX_DOWNLOAD_BYTES} bytes "
                                    "(CIFAR-10 is 170 MB); stopped, not using it")
                if time.monotonic() - start > MAX_DOWNLOAD_SECONDS:
                    raise DataError(f"download of {url} took over {MAX_DOWNLOAD_SECONDS:g} s "
                                    f"({got:,} bytes so far); stopped, not using it")
                out.write(chunk)
                h.update(chunk)
        if expected is not None and got != int(expected):
            raise DataError(f"download of {url} truncated: got {got} of {expected} bytes")
        if h.hexdigest() != md5:
            raise DataError(f"download of {url} has MD5 {h.hexdigest()}, expected {md5}; "
                            "not using it")
        os.replace(tmp, dest)
    except http.client.IncompleteRead as e:
        raise DataError(f"download of {url} truncated: got {got + len(e.partial)} bytes, "
                        f"expected {e.expected} more") from None
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"could not download {url}: {e}") from None
    finally:
        tmp.unlink(missing_ok=True)
    return dest


# A download in progress writes its temporary file every few seconds; one untouched for this
# long was left by a killed process (up to MAX_DOWNLOAD_BYTES of disk).
STALE_DOWNLOAD_SECONDS = 600


def _remove_stale_downloads(folder: Path) -> None:
    for tmp in folder.glob(".download-*.tmp"):
        with contextlib.suppress(OSError):
            if time.time() - tmp.stat().st_mtime > STALE_DOWNLOAD_SECONDS:
                tmp.unlink()
                log.info("removed %s, left by a download that did not finish", tmp)


def _check_room(url: str, folder: Path, size: int | None) -> None:
    """Refuse, before reading, a download its Content-Length says is over `MAX_DOWNLOAD_BYTES`
    or larger than the free space of ``folder``'s disk."""
    if size is None:
        return
    if size > MAX_DOWNLOAD_BYTES:
        raise DataError(f"download of {url} is {size} bytes, over {MAX_DOWNLOAD_BYTES} "
                        "(CIFAR-10 is 170 MB); not downloading it")
    free = shutil.disk_usage(folder).free
    if size > free:
        raise DataError(f"download of {url} needs {size} bytes but {folder} has {free} free")
