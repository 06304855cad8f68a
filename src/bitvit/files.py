"""Files written whole or not at all, errors that name the file, and bitvit's cache folder.

The bottom layer: every other part of bitvit may import it; it imports nothing of bitvit.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger("bitvit.files")


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


def tilde(path: Path) -> str:
    """``path`` with the home folder written ``~``, as messages show it."""
    home, text = str(Path.home()), str(path)
    return "~" + text[len(home):] if text.startswith(home + os.sep) else text


def read_cache(path: Path, version: int, what: str) -> dict[str, Any]:
    """The entries of a measurement cache (JSON ``{"version": version, "entries": {...}}``).

    A missing file is an empty cache; so is an unreadable or malformed one, or one of another
    version, with a warning naming ``what`` (e.g. "kernel cache"): it is measured again.
    """
    try:
        data = json.loads(path.read_text())
        if data.get("version") == version and isinstance(data.get("entries"), dict):
            return data["entries"]
        log.warning("%s %s has an unknown layout; measuring again", what, path)
    except FileNotFoundError:
        pass
    except (OSError, ValueError, AttributeError) as e:
        log.warning("%s %s unreadable (%s); measuring again", what, path, e)
    return {}


def save_cache(path: Path, version: int, entries: dict[str, Any], what: str) -> str:
    """Write a measurement cache whole; says where the measurement went, for a reason line:
    ``measured now, saved to PATH``, or ``measured now, not cached`` (an unwritable cache only
    costs a measurement next time: a warning, no error)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text(path, json.dumps({"version": version, "entries": entries}, indent=1) + "\n")
        return f"measured now, saved to {tilde(path)}"
    except OSError as e:
        log.warning("could not write %s %s: %s", what, path, e)
        return "measured now, not cached"
