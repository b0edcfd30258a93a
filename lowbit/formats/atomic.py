"""Atomic outputs: write into a temporary sibling and rename, so an error or Ctrl-C leaves nothing half-written.

A save killed outright (kill -9, out of memory, power loss) cannot remove its temporary sibling, so temporaries
are named `.<output>.<host>-<pid>-<random>.lowbit-tmp` (and `.lowbit-old` for the previous output folder while it is
being replaced): every save first removes the ones in its parent folder whose process, on this host, is gone.
An `.lowbit-old` folder whose output is missing (killed between the two renames) is renamed back instead.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import shutil
import socket
from pathlib import Path
from typing import Iterator

log = logging.getLogger("lowbit")

# Host names are reduced to [A-Za-z0-9_] so the name parses back unambiguously (no '.' or '-' inside the host).
_TEMPORARY = re.compile(
    r"^\.(?P<output>.+)\.(?P<host>[A-Za-z0-9_]+)-(?P<pid>\d+)-[0-9a-f]{8}\.lowbit-(?P<kind>tmp|old)$")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname())[:64] or "host"


def temporary_sibling(path: Path, kind: str = "tmp") -> Path:
    """A fresh name beside `path` that records this host and process, so a later save can tell it is stale."""
    return path.with_name(f".{path.name}.{_host()}-{os.getpid()}-{secrets.token_hex(4)}.lowbit-{kind}")


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # alive, owned by another user
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def remove_stale_temporaries(parent: str | os.PathLike) -> list[Path]:
    """Remove the temporaries of interrupted saves in `parent` (made on this host by processes that are gone);
    returns what was removed or restored."""
    parent, host, cleaned = Path(parent), _host(), []
    try:
        entries = list(parent.iterdir())
    except OSError:
        return cleaned
    for entry in entries:
        match = _TEMPORARY.match(entry.name)
        if match is None or match["host"] != host or _process_alive(int(match["pid"])):
            continue
        output = parent / match["output"]
        try:
            if match["kind"] == "old" and not os.path.lexists(output):
                os.replace(entry, output)   # killed between moving the old output aside and moving the new in
                log.warning("restored %s from %s, left by a save that was killed (process %s is gone)", output,
                            entry.name, match["pid"])
            else:
                _remove(entry)
                log.info("removed %s, left by a save that was killed (process %s is gone)", entry, match["pid"])
        except OSError:
            continue   # another process cleaned it first, or it is not ours to remove: leave it
        cleaned.append(entry)
    return cleaned


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path`, on any exception it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path.parent)
    tmp = temporary_sibling(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666 & ~_umask())   # ordinary output permissions
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; on success it replaces `path`, on any exception it is removed."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        from lowbit.errors import LowbitError

        raise LowbitError(f"output {path} exists and is not a folder; choose another -o path")
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path.parent)
    tmp = temporary_sibling(path)
    tmp.mkdir(mode=0o777 & ~_umask())
    try:
        yield tmp
        if path.exists():
            old = temporary_sibling(path, "old")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
