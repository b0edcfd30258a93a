"""Atomic outputs whose save was killed (issue 13): the next save into the same folder removes the leftovers."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from lowbit.formats.atomic import atomic_dir, atomic_file, remove_stale_temporaries, temporary_sibling

KILLED_SAVE = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from lowbit.formats.atomic import atomic_dir, atomic_file
    out, kind = Path(sys.argv[1]), sys.argv[2]
    with (atomic_dir if kind == "dir" else atomic_file)(out) as tmp:
        if kind == "dir":
            (tmp / "model.safetensors").write_bytes(b"half" * 1000)
        else:
            tmp.write_bytes(b"half" * 1000)
        print(tmp, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)   # kill -9 mid-save: no cleanup code runs
""")


def _killed_save(out, kind: str):
    """Run a save of `out` in a child process killed mid-save; the temporary it left behind."""
    proc = subprocess.run([sys.executable, "-c", KILLED_SAVE, str(out), kind], capture_output=True, text=True,
                          timeout=120, cwd=os.getcwd())
    assert proc.returncode == -9, proc.stderr
    left = out.parent / proc.stdout.strip().rsplit("/", 1)[-1]
    assert left.exists()
    return left


@pytest.mark.parametrize("kind", ["dir", "file"])
def test_next_save_removes_what_a_killed_save_left(tmp_path, kind):
    out = tmp_path / ("model" if kind == "dir" else "model.gguf")
    if kind == "dir":
        out.mkdir()
        (out / "config.json").write_text("previous")
    else:
        out.write_text("previous")
    left = _killed_save(out, kind)
    # The previous output is intact; the leftover names the dead process.
    assert (out / "config.json" if kind == "dir" else out).read_text() == "previous"
    assert f"-{left.name.split('-')[-2]}-" in left.name and left.name.endswith(".lowbit-tmp")
    # Any later save in the same folder (here: of another output) removes it.
    with atomic_file(tmp_path / "other.json") as tmp:
        tmp.write_text("{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([out.name, "other.json"])


def test_live_saves_and_foreign_files_are_left_alone(tmp_path):
    live = temporary_sibling(tmp_path / "busy")            # this process: alive
    live.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        other = tmp_path / f".model.{live.name.split('.')[2].rsplit('-', 2)[0]}-{sleeper.pid}-0123abcd.lowbit-tmp"
        other.mkdir()                                       # another live process on this host
        foreign_host = tmp_path / ".model.elsewhere-1-0123abcd.lowbit-tmp"   # maybe alive on another machine
        foreign_host.mkdir()
        unrelated = tmp_path / ".model.abc.tmp"
        unrelated.write_text("not ours")
        assert remove_stale_temporaries(tmp_path) == []
        assert live.exists() and other.exists() and foreign_host.exists() and unrelated.exists()
    finally:
        sleeper.kill()
        sleeper.wait()
    # Once that process is gone its folder is stale.
    assert remove_stale_temporaries(tmp_path) == [other] and not other.exists()


def test_old_output_moved_aside_by_a_killed_save_is_restored(tmp_path):
    """Killed between moving the previous output aside and moving the new one in: the old one comes back."""
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(done.stdout)
    host = temporary_sibling(tmp_path / "x").name.split(".")[2].rsplit("-", 2)[0]
    old = tmp_path / f".model.{host}-{dead_pid}-0123abcd.lowbit-old"
    old.mkdir()
    (old / "config.json").write_text("previous")
    with atomic_dir(tmp_path / "other") as tmp:
        (tmp / "f").write_text("x")
    assert (tmp_path / "model" / "config.json").read_text() == "previous" and not old.exists()
