"""Atomic file writing: long jobs write to a temporary name and rename when complete."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from atod_edge.errors import UserError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "", kind: str | None = None,
                need_bytes: int | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    Works for files and directories. A crash or exception leaves `path` untouched. kind: `path`
    is an output of that kind (OUTPUT_KINDS); an existing directory there is replaced only when it
    is empty or an earlier output of that kind (check_output's rule, checked again before the
    rename), else UserError. A full disk (or a file size limit) while the block writes becomes a
    one-line DiskFullError naming `path` (and `need_bytes`, the size being written, if known).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    target = tmp / (path.name + suffix)
    try:
        try:
            yield target
        except Exception as e:
            full = disk_full_error(e, path, need_bytes)
            if full is None:
                raise
            raise full from None
        if kind is not None:
            check_output(path, kind, what="output")
        if path.is_dir() and not path.is_symlink():
            # os.replace cannot replace a non-empty directory: move the old one aside first.
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(target, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(target, path)
        _fsync_dir(path.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def append_line(path: str | os.PathLike, line: str) -> None:
    """Append one line with a single write on an O_APPEND descriptor (no interleaving, no half lines
    from this process short of a crash mid-syscall; readers tolerate a torn last line anyway)."""
    data = (line.rstrip("\n") + "\n").encode("utf-8")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        # After a crash mid-write the file ends in a torn line: start a fresh line so this
        # record is not glued onto it (the reader skips the torn one alone).
        if _ends_mid_line(fd):
            data = b"\n" + data
        os.write(fd, data)
    finally:
        os.close(fd)


#: a JSONL line longer than this is skipped and counted like a torn one, read past in blocks and
#: never held whole (an episode of 30 turns with 1 MB observations is about 35 MB)
MAX_JSONL_LINE_BYTES = 64 << 20


def parse_json_line(raw: bytes | str, max_bytes: int = MAX_JSONL_LINE_BYTES) -> dict | None:
    """One JSONL line as a dict, or None when it is torn, corrupt, not an object, longer than
    `max_bytes` or nested too deeply for the parser (RecursionError). Never raises on content."""
    if len(raw) > max_bytes:
        return None
    try:
        obj = json.loads(raw)
    except (ValueError, RecursionError):   # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return None
    return obj if isinstance(obj, dict) else None


def read_jsonl(path: str | os.PathLike, max_line_bytes: int = MAX_JSONL_LINE_BYTES) -> tuple[list[dict], int]:
    """Read a JSONL file; return (records, number of lines skipped: torn, corrupt, not an object,
    nested too deeply or longer than `max_line_bytes`)."""
    records: list[dict] = []
    skipped = 0
    with open(path, "rb") as f:
        while raw := f.readline(max_line_bytes + 1):
            if len(raw) > max_line_bytes and not raw.endswith(b"\n"):
                skipped += 1                       # oversized: read past the rest of it in blocks
                while (rest := f.readline(1 << 20)) and not rest.endswith(b"\n"):
                    pass
                continue
            if not raw.strip():
                continue
            obj = parse_json_line(raw, max_line_bytes + 1)
            if obj is None:
                skipped += 1
            else:
                records.append(obj)
    return records, skipped


def _ends_mid_line(fd: int) -> bool:
    size = os.fstat(fd).st_size
    if size == 0:
        return False
    os.lseek(fd, size - 1, os.SEEK_SET)
    return os.read(fd, 1) != b"\n"


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cache_dir() -> Path:
    """Where presets are built: $ATOD_EDGE_CACHE, else ~/.cache/atod-edge."""
    env = os.environ.get("ATOD_EDGE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "atod-edge"


# --- outputs: what an --out may name, the run lock, a full disk --------------------------------

#: the kinds of output directory the commands write, each recognised by its marker files (the
#: first kind whose markers a directory holds is its kind): (description, marker sets: a
#: directory holding every file of one set is of that kind)
OUTPUT_KINDS: dict[str, tuple[str, tuple[tuple[str, ...], ...]]] = {
    "sft-work": ("an sft run's work dir", (("config.yaml", "data.json"), ("dagger_demos.jsonl",))),
    "run": ("a training run", (("config.yaml", "run.json"), ("config.yaml", "metrics.jsonl"),
                               ("config.yaml", "checkpoints"))),
    "export": ("an export", (("export.json",),)),
    "model": ("a model", (("config.json",),)),
    "eval": ("an evaluation", (("report.json", "episodes.jsonl"), ("pairs.json",))),
}
#: kinds whose earlier output a new one replaces; the others are continued with --resume
REPLACEABLE_KINDS = ("export", "model", "eval")
#: the run lock's file inside a run (or sft work) directory
LOCK_FILE = ".lock"


def output_kind(path: str | os.PathLike) -> str | None:
    """What the existing directory `path` holds: a kind of OUTPUT_KINDS, "empty" (nothing but a
    run lock file), or None (something else)."""
    path = Path(path)
    names = {p.name for p in path.iterdir()} - {LOCK_FILE}
    if not names:
        return "empty"
    for kind, (_, marker_sets) in OUTPUT_KINDS.items():
        if any(all(m in names for m in markers) for markers in marker_sets):
            return kind
    return None


def check_output(path: str | os.PathLike, kind: str, force: bool = False, what: str = "--out") -> Path:
    """The output rule of every command, checked before any work: `path` may be new (its nearest
    existing parent a directory this process can write in), an empty directory, or an earlier
    output of the same `kind` (OUTPUT_KINDS; replaced only once the new one is complete, see
    atomic_path); anything else is refused with a one-line UserError: a file where a directory is
    expected, a directory of another kind or a non-empty foreign one (force=True replaces a
    foreign one), an unwritable place. Kinds not in REPLACEABLE_KINDS (a training run) are
    refused when they exist: they are continued with --resume. Returns `path` as a Path."""
    path = Path(path)
    description = OUTPUT_KINDS[kind][0]
    if path.exists() and not path.is_dir():
        raise UserError(f"{what} {path} is a file, but {description} is a directory: give a new path or an "
                        f"earlier {description.split(' ', 1)[1]}")
    if path.is_dir():
        found = output_kind(path)
        if found == kind and kind not in REPLACEABLE_KINDS:
            raise UserError(f"{what} {path} already holds {description}: continue it with --resume {path}, "
                            f"or give another {what}")
        if found not in ("empty", kind) and not (force and found is None):
            held = f"holds {OUTPUT_KINDS[found][0]}" if found else "is a non-empty directory"
            hint = ", or add --force to replace it and everything in it" if found is None and kind in \
                REPLACEABLE_KINDS else ""
            raise UserError(f"{what} {path} {held}, not {description}; refusing to replace it: give a new "
                            f"path{hint}")
        _check_writable(path if found == "empty" else path.parent, what, path)
        return path
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"{what} {path}: {parent} is a file, not a directory")
    _check_writable(parent, what, path)
    return path


def _check_writable(directory: Path, what: str, path: Path) -> None:
    """Create and remove a scratch directory in `directory` (os.access says yes to root on a
    read-only mount)."""
    try:
        shutil.rmtree(tempfile.mkdtemp(prefix=".atod-edge-write-check.", dir=directory))
    except OSError as e:
        raise UserError(f"{what} {path}: cannot write in {directory} ({e.strerror or type(e).__name__})") from None


@contextlib.contextmanager
def run_lock(directory: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive OS lock (fcntl.flock on DIR/.lock, which records the holder's pid) for the
    block: a second process that asks for it is refused with a UserError naming the holder. The
    kernel drops the lock when the holder exits, however it ends. Re-entrant within a process;
    a no-op where fcntl does not exist (Windows)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_FILE
    key = str(path.resolve())
    if key in _HELD_LOCKS:
        yield
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        holder = os.read(fd, 64).decode("ascii", "replace").strip() or "unknown"
        os.close(fd)
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise
        raise UserError(f"{directory} is in use by another atod-edge process (pid {holder}); wait for it to "
                        "end, or stop it, before writing to it") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _HELD_LOCKS[key] = fd
    try:
        yield
    finally:
        del _HELD_LOCKS[key]
        os.close(fd)   # releases the lock


_HELD_LOCKS: dict[str, int] = {}   # lock file -> descriptor, for the locks this process holds


class DiskFullError(UserError):
    """A write failed for want of space (ENOSPC, EDQUOT) or a file size limit (EFBIG)."""


_DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}
# how libraries that do their own I/O report them: safetensors (Rust io::Error), torch.save's zip
# writer ("file write failed", "unexpected pos" when a write came up short)
_DISK_FULL_TEXT = ("no space left on device", "file too large", "disk quota exceeded", "os error 28",
                   "os error 27", "code: 28", "code: 27", "file write failed", "unexpected pos")


def is_disk_full(exc: BaseException) -> bool:
    """Whether `exc` (or an exception it was raised from) is a write that ran out of space."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, OSError) and exc.errno in _DISK_FULL_ERRNOS:
            return True
        if isinstance(exc, (OSError, RuntimeError)) or type(exc).__name__ == "SafetensorError":
            text = str(exc).lower()
            if any(t in text for t in _DISK_FULL_TEXT):
                return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def disk_full_error(exc: BaseException, path: str | os.PathLike | None,
                    need_bytes: int | None = None) -> DiskFullError | None:
    """A one-line DiskFullError for `exc` when it is a full disk or a file size limit (naming
    `path`, the bytes needed when known and the bytes free), else None."""
    if not is_disk_full(exc):
        return None
    limit = any(isinstance(e, OSError) and e.errno == errno.EFBIG for e in (exc, exc.__cause__, exc.__context__)) \
        or "too large" in str(exc).lower() or "os error 27" in str(exc).lower()
    reason = "the file size limit was reached (EFBIG)" if limit else "no space left on the device"
    where = Path(path) if path is not None else Path(getattr(exc, "filename", None) or ".")
    free = _free_bytes(where)
    need = f", needs about {_size(need_bytes)}" if need_bytes else ""
    space = f", {_size(free)} free there" if free is not None else ""
    return DiskFullError(f"cannot write {where}: {reason}{need}{space}")


def _free_bytes(path: Path) -> int | None:
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def _size(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} bytes"
