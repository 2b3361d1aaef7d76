"""What every command that writes a folder (`train.py`, `ctal-export`, `ctal-predict`, `dataset_scripts.publish`)
guarantees about it:

- Atomic: the files are written into a hidden temporary folder beside the target and renamed into place at the
  end (`atomic_folder`), so an interrupted or failed command leaves the target as it was, never half-written.
- The source is never the destination (`check_not_source`): a command refuses to write into the folder it reads
  (or a folder holding it, or inside it).
- One writer at a time (`OutputLock`): a lock file beside the target names the run that holds it (pid, host,
  command, start time); a second run on the same target is refused unless told to ignore the lock. A lock left by
  a process that no longer runs on this host is taken over with a warning.

Standard library only: the command lines check their outputs with it before torch is imported."""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import shutil
import socket
import sys
import tempfile
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

logger = logging.getLogger(__name__)

LOCK_SUFFIX = ".ctal-lock"


class OutputInUseError(ValueError):
    """The output folder is locked by another run."""


def _absolute(path: str | os.PathLike) -> Path:
    return Path(os.path.abspath(Path(path).expanduser()))


def _existing_ancestor(path: Path) -> Path:
    base = path
    while not base.exists():
        base = base.parent
    return base


# ------------------------------------------------------------------------------------------------ source checks
def check_not_source(target: str | os.PathLike, sources: Mapping[str, str | os.PathLike | None], target_flag: str):
    """Refuses a `target` folder that is one of the command's `sources` (flag -> path), holds one, or lies inside
    one: writing (or replacing) it would destroy what the command reads. Sources that are not local paths (Hub ids,
    None) are skipped."""
    out = _absolute(target).resolve()
    for flag, source in sources.items():
        if source is None or not isinstance(source, (str, os.PathLike)) or not Path(source).expanduser().exists():
            continue
        src = _absolute(source).resolve()
        if out == src:
            problem = "is the same folder as"
        elif src in out.parents:
            problem = "lies inside"
        elif out in src.parents:
            problem = "holds"
        else:
            continue
        raise ValueError(
            f"{target_flag} {os.fspath(target)!r} {problem} {flag} {os.fspath(source)!r}: writing it would replace "
            f"what the command reads. Choose another {target_flag}."
        )


# ------------------------------------------------------------------------------------------------ locks
def lock_path(target: str | os.PathLike) -> Path:
    """Where the lock of `target` lives: beside it (so that taking it creates nothing inside the target)."""
    target = _absolute(target)
    return target.parent / f".{target.name}{LOCK_SUFFIX}"


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def describe_holder(holder: Mapping) -> str:
    return (
        f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}, command "
        f"{holder.get('command')!r}"
    )


class OutputLock:
    """A lock file beside `target`, created atomically (`O_EXCL`), naming this run. Use as a context manager, or
    `acquire()` / `release()`. `ignore_lock` takes the folder over from another live run (with a warning);
    `ignore_flag` is the flag that says so, named in the refusal."""

    def __init__(
        self,
        target: str | os.PathLike,
        command: str | None = None,
        ignore_lock: bool = False,
        ignore_flag: str = "--ignore_lock",
        target_flag: str = "the output folder",
    ):
        self.target = _absolute(target)
        self.path = lock_path(self.target)
        self.command = command if command is not None else " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])
        self.ignore_lock, self.ignore_flag, self.target_flag = ignore_lock, ignore_flag, target_flag
        self.token = uuid.uuid4().hex
        self.held = False
        self._created_parents: list[Path] = []

    def _record(self) -> dict:
        return {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": self.command,
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "target": str(self.target),
            "token": self.token,
        }

    def read_holder(self) -> dict | None:
        try:
            holder = json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {"pid": None, "host": None, "command": "unreadable lock file", "started": None}
        return holder if isinstance(holder, dict) else {"command": "unreadable lock file"}

    def acquire(self) -> OutputLock:
        parent = self.path.parent
        missing = []
        while not parent.exists():
            missing.append(parent)
            parent = parent.parent
        if not parent.is_dir():
            raise ValueError(f"{self.target_flag} {str(self.target)!r}: {str(parent)!r} is a file.")
        for folder in reversed(missing):
            folder.mkdir()
            self._created_parents.append(folder)
        record = json.dumps(self._record(), indent=2)
        for _ in range(2):
            try:
                descriptor = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self.read_holder()
                if holder is None:  # released meanwhile
                    continue
                stale = holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int)
                stale = stale and not _process_alive(holder["pid"])
                if not (stale or self.ignore_lock):
                    self._remove_created_parents()
                    raise OutputInUseError(
                        f"{self.target_flag} {str(self.target)!r} is in use by another run ({describe_holder(holder)};"
                        f" lock file {str(self.path)!r}). Wait for it to finish or choose another folder; if that "
                        f"run is gone, pass {self.ignore_flag} (or delete the lock file)."
                    ) from None
                reason = "left by a process that no longer runs" if stale else f"ignored ({self.ignore_flag})"
                logger.warning(f"Taking over {self.path}: lock of {describe_holder(holder)} {reason}.")
                temporary = self.path.with_name(f"{self.path.name}.{self.token}")
                temporary.write_text(record)
                os.replace(temporary, self.path)
                self.held = True
                return self
            with os.fdopen(descriptor, "w") as handle:
                handle.write(record)
            self.held = True
            return self
        raise OutputInUseError(f"Cannot take the lock {str(self.path)!r}: it keeps changing hands.")

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        holder = self.read_holder()
        if holder is not None and holder.get("token") == self.token:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        self._remove_created_parents()

    def _remove_created_parents(self) -> None:
        for folder in reversed(self._created_parents):
            with contextlib.suppress(OSError):
                folder.rmdir()  # only when empty
        self._created_parents = []

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# ------------------------------------------------------------------------------------------------ atomic writes
def staging_dir(target: str | os.PathLike, purpose: str = "out") -> Path:
    """A new hidden temporary folder beside `target` (in the deepest existing folder above it, so that the final
    rename stays on one file system)."""
    target = _absolute(target)
    base = _existing_ancestor(target.parent)
    if not base.is_dir():
        raise ValueError(f"{str(target)!r}: {str(base)!r} is a file, so the folder cannot be made.")
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.ctal-{purpose}-", dir=base))


def replace_folder(staging: Path, target: Path) -> None:
    """Replaces `target` (absent, or a folder to overwrite) with `staging`, by renames on one file system."""
    target = _absolute(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        trash = target.with_name(f".{target.name}.replaced-{uuid.uuid4().hex[:8]}")
        os.replace(target, trash)
        try:
            os.replace(staging, target)
        except BaseException:
            os.replace(trash, target)
            raise
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(staging, target)


def move_into(staging: Path, target: Path, last: Sequence[str] = ("config.json",)) -> None:
    """Moves every entry of `staging` into the folder `target` (created when missing), each by one rename (a
    sub-folder replaces the one of the same name whole); the names in `last` are moved last, so a reader that
    finds them finds the rest complete. Other files already in `target` stay."""
    target = _absolute(target)
    if not target.exists():
        replace_folder(staging, target)
        return

    def order(path: Path) -> tuple[int, str]:
        return (list(last).index(path.name) + 1 if path.name in last else 0, path.name)

    for path in sorted(staging.iterdir(), key=order):
        destination = target / path.name
        if path.is_dir() and destination.is_dir():
            replace_folder(path, destination)
        else:
            os.replace(path, destination)
    shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def atomic_folder(target: str | os.PathLike, merge: bool = False, purpose: str = "out") -> Iterator[Path]:
    """`with atomic_folder(target) as staging:` write into `staging`; at the end of the block it replaces `target`
    (or, with `merge`, its entries are moved into `target`, see `move_into`). If the block raises, `staging` is
    removed and `target` is untouched."""
    target = _absolute(target)
    staging = staging_dir(target, purpose)
    try:
        yield staging
        (move_into if merge else replace_folder)(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def has_files(folder: Path) -> bool:
    """Whether `folder` holds any file (empty sub-folders do not count)."""
    return any(path.is_file() or path.is_symlink() for path in Path(folder).rglob("*"))


@contextlib.contextmanager
def claimed_output_dir(
    target: str | os.PathLike,
    command: str | None = None,
    ignore_lock: bool = False,
    ignore_flag: str = "--ignore_lock",
    target_flag: str = "--output_dir",
    is_main_process: bool = True,
) -> Iterator[OutputLock | None]:
    """For a long run writing into `target` over time (training): the lock is held for the whole block (by the
    main process), and if the block fails before any file was written the folder it created is removed again, so
    an early error leaves nothing behind."""
    target = _absolute(target)
    existed = target.exists()
    lock = OutputLock(target, command, ignore_lock, ignore_flag, target_flag) if is_main_process else None
    if lock is not None:
        lock.acquire()
    try:
        yield lock
    except BaseException:
        if is_main_process and not existed and target.is_dir() and not has_files(target):
            shutil.rmtree(target, ignore_errors=True)
        raise
    finally:
        if lock is not None:
            lock.release()


__all__ = [
    "LOCK_SUFFIX",
    "OutputInUseError",
    "OutputLock",
    "atomic_folder",
    "check_not_source",
    "claimed_output_dir",
    "describe_holder",
    "has_files",
    "lock_path",
    "move_into",
    "replace_folder",
    "staging_dir",
]
