"""Files written whole or not at all, errors that name the file, and bitvit's cache folder.

The bottom layer: every other part of bitvit may import it; it imports nothing of bitvit.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any


def error_reason(e: BaseException, limit: int = 160) -> str:
    """A short one-line reason from a library exception (torch.load's are paragraphs long)."""
    text = str(e)
    if "Weights only load failed" in text or "WeightsUnpickler" in text:
        return _unpickler_reason(text)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    reason = lines[0] if lines else type(e).__name__
    return reason if len(reason) <= limit else reason[:limit - 3] + "..."


def _unpickler_reason(text: str) -> str:
    """Why torch.load(weights_only=True) refused a file. Its message suggests loading with
    weights_only=False, which would run whatever code the file holds: never pass that on."""
    refused = re.search(r"GLOBAL ([\w.]+)", text)
    if refused:
        return (f"torch's safe loader refuses the global {refused.group(1)}: the file holds "
                "objects or code beyond tensors and plain data; not loaded")
    cause = text.split("WeightsUnpickler error:", 1)[-1]
    lines = [line.strip() for line in cause.splitlines() if line.strip()
             and "weights_only" not in line and not line.startswith("Check the documentation")]
    detail = f" ({lines[0][:80]})" if lines else ""
    return f"torch's safe loader refuses its contents{detail}; not loaded"


def sha256(path: str | Path) -> str:
    """The SHA-256 of a file's bytes, read in chunks (pretrained weights run to gigabytes)."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def describe(e: OSError) -> str:
    """``path: reason``, the one-line form of an operating-system error."""
    reason = e.strerror or str(e)
    return f"{e.filename}: {reason}" if e.filename else reason


def _as_os_error(e: BaseException, path: Path) -> OSError | None:
    """The OSError behind a library's write error (safetensors says "os error 28"), naming
    ``path``; None when it is not one."""
    if isinstance(e, OSError):
        if e.errno is None:
            return OSError(errno.EIO, str(e), str(path))
        if not e.filename:
            e.filename = str(path)
        return e
    found = re.search(r"os error (\d+)", str(e))
    if found is None:
        return None
    code = int(found.group(1))
    return OSError(code, os.strerror(code), str(path))


def write_file(path: Path, write: Callable[[Path], Any]) -> None:
    """``write(path)``; an OS failure (also one wrapped by safetensors) raises OSError naming
    ``path``."""
    try:
        write(path)
    except Exception as e:  # noqa: BLE001 - libraries wrap OS errors in their own types
        os_error = _as_os_error(e, path)
        if os_error is None or os_error is e:
            raise
        raise os_error from None


def atomic_file(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """Write ``path`` as a whole or not at all: ``write(tmp)`` fills a temporary file beside it,
    which is synced and renamed over ``path``. On any failure the temporary is removed and an OS
    failure raises OSError naming ``path``."""
    path = Path(path)
    # Per process, so that two writers of one file never share a temporary; created by
    # ``write`` itself, so with the usual permissions (mkstemp's are private).
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write_file(tmp, write)
        with tmp.open("rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        if e.filename in (None, str(tmp)):
            e.filename = str(path)  # the user knows the file, not its temporary
        raise
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_text(path: str | Path, text: str) -> Path:
    return atomic_file(path, lambda tmp: tmp.write_text(text))


def resolve_cache_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """``cache_dir``, then $BITVIT_CACHE, then ~/.cache/bitvit."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("BITVIT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "bitvit"
