"""Files written whole or not at all, small files (and YAML) read within limits, errors that
name the file, warnings folded into one line, and bitvit's cache folder.

The bottom layer: every other part of bitvit may import it; it imports nothing of bitvit.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import stat
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger("bitvit.files")


# Configs, sweep files, run.json, checksums: a few kilobytes. Far above any real one, far below
# what would hang or exhaust memory (/dev/zero, a weights file given as --config).
MAX_TEXT_BYTES = 1 << 20


class EnvError(ValueError):
    """An environment variable bitvit reads ($BITVIT_ENGINE, $BITVIT_INT_KERNEL) with a value it
    does not take; one line naming it."""


class FileRefused(ValueError):
    """A file bitvit will not read (not a regular file, or over its size limit); one line naming
    it. Callers re-raise the message as their own error type."""


class Notice(UserWarning):
    """Something bitvit did on its own that the user should know (a fallback to an older
    checkpoint, say); the command line prints it as one line."""


def one_line(text: str, limit: int = 2000) -> str:
    """A message as one line of bounded length: a path or class name may hold a newline, or be
    ten thousand characters long."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def show_warnings_as_lines(prefix: str) -> None:
    """Show every warning as one line on stderr, ``PREFIX: warning: ...``: bitvit's notices as
    they are, others (a library's) with their kind; Python's format takes two lines. Call it
    inside ``warnings.catch_warnings()``, which restores the printer and filters."""

    def show(message: Warning | str, category: type[Warning], filename: str, lineno: int,
             file: object = None, line: str | None = None) -> None:
        kind = "" if issubclass(category, Notice) else f"{category.__name__}: "
        print(f"{prefix}: warning: {kind}{one_line(str(message))}", file=sys.stderr, flush=True)

    warnings.showwarning = show
    # Once per message and place: a checkpoint resolved twice in one command says it once.
    warnings.simplefilter("default", Notice)


class LogAsNotice(logging.Handler):
    """bitvit's log warnings (a cache measured again, a constant channel) as `Notice` warnings,
    so that the command line prints them as its other notices, not as bare lines."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)

    def emit(self, record: logging.LogRecord) -> None:
        warnings.warn(Notice(record.getMessage()), stacklevel=2)


def parse_json(text: str | bytes) -> Any:
    """``json.loads``, with input nested past Python's recursion limit a ValueError like any
    other malformed JSON (a file of ``[[[[...`` must give one line, not a traceback)."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def read_limited(path: str | Path, what: str, limit: int = MAX_TEXT_BYTES) -> bytes:
    """The bytes of ``path``, a regular file of at most ``limit`` bytes; `FileRefused` naming it
    and ``what`` it should be otherwise. Missing files and permissions raise OSError as usual,
    a folder IsADirectoryError."""
    path = Path(path)
    # O_NONBLOCK: opening a FIFO must not wait for a writer; fstat then judges what was opened.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
        if not stat.S_ISREG(st.st_mode):
            raise FileRefused(f"{path}: not a regular file ({_kind(st.st_mode)}); expected "
                              f"a {what}")
        if st.st_size > limit:
            raise FileRefused(f"{path}: {st.st_size:,} bytes; a {what} is at most {limit:,} "
                              "bytes")
        chunks, size = [], 0
        # Read to the limit, not to st_size: a file may grow, and /proc files report size 0.
        while size <= limit and (chunk := os.read(fd, min(1 << 16, limit + 1 - size))):
            chunks.append(chunk)
            size += len(chunk)
    finally:
        os.close(fd)
    if size > limit:
        raise FileRefused(f"{path}: more than {limit:,} bytes; a {what} is at most {limit:,} "
                          "bytes")
    return b"".join(chunks)


# Lists and mappings inside one another: a config is 3 deep. PyYAML's composer recurses once per
# level, so 20,000 levels would be a RecursionError.
MAX_YAML_DEPTH = 100


class YamlRefused(yaml.YAMLError):
    """Valid YAML that `load_yaml` will not read; str() is the reason, one line."""


class _StrictLoader(yaml.SafeLoader):
    """yaml.safe_load's loader, less what lets a small text take unbounded time or memory.

    An anchor on a list or mapping is refused, hence any alias of one: nested aliases multiply
    (the "billion laughs": 384 bytes expand to 9**8 values, which a message or a comparison
    then walks). Anchors and aliases of single values stay (studies/kd-cpu.yaml names its
    teachers so): they repeat nothing that grows. Nesting is cut at MAX_YAML_DEPTH.
    """

    _depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if not isinstance(event, yaml.CollectionStartEvent):
            return super().compose_node(parent, index)
        line = event.start_mark.line + 1
        if event.anchor is not None:
            raise YamlRefused(f"YAML aliases of lists and mappings are not supported (anchor &"
                              f"{_shorten(event.anchor, 40)} at line {line}); write the values out")
        if self._depth >= MAX_YAML_DEPTH:
            raise YamlRefused(f"nested too deeply (more than {MAX_YAML_DEPTH} levels of lists "
                              f"and mappings at line {line})")
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        # PyYAML keeps the last of a repeated key: one of two settings would vanish unsaid.
        seen: set[str] = set()
        for key, _ in node.value:
            if isinstance(key, yaml.ScalarNode):
                if key.value in seen:
                    raise YamlRefused(f"key {_shorten(key.value, 40)!r} given twice in one mapping "
                                      f"(line {key.start_mark.line + 1})")
                seen.add(key.value)
        return super().construct_mapping(node, deep)


def load_yaml(text: str) -> Any:
    """``yaml.safe_load(text)`` within bounds: `YamlRefused` for an anchor on a list or mapping
    (an alias bomb), nesting deeper than MAX_YAML_DEPTH or a key given twice in a mapping."""
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader)
    except ValueError as e:  # int() of an integer of more than sys.get_int_max_str_digits()
        raise YamlRefused(f"a value YAML cannot read ({_shorten(str(e), 100)})") from None


def yaml_reason(e: yaml.YAMLError) -> str:
    """The first line of a YAML error, without PyYAML's multi-line context."""
    problem = getattr(e, "problem", None)
    return " ".join(str(problem or e).split()) or type(e).__name__


def _shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISFIFO, "a pipe"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "a special file"


@contextlib.contextmanager
def caught_warnings() -> Iterator[list[warnings.WarningMessage]]:
    """Record the warnings a library raises in the block (torch, PIL, numpy reading a user's
    file) instead of letting them print their own lines; `warning_note` folds them into
    bitvit's message."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield caught


def warning_note(caught: list[warnings.WarningMessage], limit: int = 160) -> str:
    """The caught warnings as one clause ("; warning: ..."), "" when there were none."""
    seen: list[str] = []
    for w in caught:
        # The first sentence: the rest is the library's advice, meant for its own callers.
        text = " ".join(str(w.message).split()).split(". ")[0] or w.category.__name__
        if text not in seen:
            seen.append(text)
    if not seen:
        return ""
    text = "; ".join(seen)
    return "; warning: " + (text if len(text) <= limit else text[:limit - 3] + "...")


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


# A torch.save zip's central directory holds one short record per tensor: a directory past
# this is not a weights file's, and parsing it would itself take memory (a ZipInfo per record).
MAX_ZIP_DIRECTORY = 16 << 20
_EOCD, _ZIP64_LOCATOR, _ZIP64_EOCD = b"PK\x05\x06", b"PK\x06\x07", b"PK\x06\x06"


def stored_bytes(path: str | Path, what: str = "weights file") -> int:
    """What reading ``path`` whole takes: its size, or for a zip (torch.save's format) the
    larger of that and its entries' declared sizes unpacked (a small zip can inflate to any
    size). `FileRefused` (one line naming the file) for anything but a readable regular file,
    or a zip whose directory is larger than `MAX_ZIP_DIRECTORY`; a zip too damaged to read
    counts its size (its loader then says what is wrong)."""
    import zipfile

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO must not wait for a writer
    except OSError as e:
        raise FileRefused(f"{path}: cannot read ({e.strerror or e})") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise FileRefused(f"{path}: not a regular file ({_kind(st.st_mode)}); expected a "
                              f"{what}")
        if f.read(4) != b"PK\x03\x04":
            return st.st_size  # not a zip: safetensors, a legacy torch file
        directory = _zip_directory_bytes(f, st.st_size)
        if directory > MAX_ZIP_DIRECTORY:
            raise FileRefused(f"{path}: a zip whose directory claims {directory:,} bytes; a "
                              f"{what}'s is at most {MAX_ZIP_DIRECTORY:,}")
        try:
            f.seek(0)
            with zipfile.ZipFile(f) as archive:
                return max(st.st_size, sum(info.file_size for info in archive.infolist()))
        except Exception:  # noqa: BLE001 - zipfile raises many types (NotImplementedError too)
            return st.st_size


def _zip_directory_bytes(f: Any, size: int) -> int:
    """The central directory's size as the end record says (zip64's where it defers), read
    from the file's last 64 KiB; 0 where there is none (zipfile then finds it damaged)."""
    f.seek(max(size - (1 << 16) - 22, 0))
    tail = f.read()
    at = tail.rfind(_EOCD)
    if at < 0 or len(tail) < at + 22:
        return 0
    directory = int.from_bytes(tail[at + 12:at + 16], "little")
    locator = tail[at - 20:at] if at >= 20 else b""
    if directory == 0xFFFFFFFF and locator[:4] == _ZIP64_LOCATOR:
        f.seek(int.from_bytes(locator[8:16], "little"))
        record = f.read(56)
        if record[:4] == _ZIP64_EOCD and len(record) == 56:
            directory = int.from_bytes(record[40:48], "little")
    return directory


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


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this machine."""
    try:
        os.kill(pid, 0)  # signal 0: only checks that the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    except (OverflowError, ValueError):
        return False
    return True


def process_start(pid: int) -> float | None:
    """When process ``pid`` started (seconds since the epoch); None when unknown (no /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        # Field 22 of /proc/PID/stat (index 19 after the command name): ticks after boot.
        return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def _temporary(path: Path, pid: int) -> Path:
    return path.with_name(f".{path.name}.{pid}.tmp")


def remove_stale_temporaries(path: Path) -> list[Path]:
    """Remove the temporaries of `atomic_file` writes of ``path`` left by killed processes:
    those whose pid is gone, or whose pid now belongs to a process started after the temporary
    was last written (the pid was reused). A live writer's temporary is left alone. Returns
    what was removed."""
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(\d+)\.tmp")
    removed = []
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return []
    for entry in entries:
        found = pattern.fullmatch(entry.name)
        if found is None or int(found.group(1)) == os.getpid():
            continue
        pid = int(found.group(1))
        try:
            written = entry.stat(follow_symlinks=False).st_mtime
            if pid_alive(pid):
                started = process_start(pid)
                if started is None or started <= written + 1.0:  # 1 s: clock-tick rounding
                    continue  # its writer may still be at work
            os.unlink(entry.path)
            removed.append(Path(entry.path))
        except OSError:
            continue  # gone already, or not ours to remove: the write goes on regardless
    return removed


def _umask() -> int:
    try:  # Linux says it without changing it: no window in which another thread's files get 022
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere reading it means setting it: put it straight back
    os.umask(mask)
    return mask


def sync_path(path: Path) -> None:
    """fsync a file, or a folder (its entries: a rename in it); a folder that cannot be
    opened for it (not on every OS) is left as is."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        if path.is_dir():
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not path.is_dir():
            raise
    finally:
        os.close(fd)


def atomic_file(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """Write ``path`` as a whole or not at all: ``write(tmp)`` fills a temporary file beside it,
    which is synced and renamed over ``path``. On any failure the temporary is removed and an OS
    failure raises OSError naming ``path``. Temporaries of earlier writes of ``path`` by killed
    processes are removed first (`remove_stale_temporaries`)."""
    path = Path(path)
    remove_stale_temporaries(path)
    # Per process, so that two writers of one file never share a temporary; created by
    # ``write`` itself (mkstemp's would be private).
    tmp = _temporary(path, os.getpid())
    try:
        write_file(tmp, write)
        sync_path(tmp)
        # Some writers (safetensors) create their file private: a shipped model must be readable
        # as any file the user writes is.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
        sync_path(path.parent)  # the rename itself, so a crash cannot bring the old file back
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
        data = parse_json(read_limited(path, what))  # FileRefused is a ValueError
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
