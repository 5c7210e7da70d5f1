"""One writer per folder (cleanplate.locks): a second holder is refused with "busy", a released or a dead
holder's lock can be taken again."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cleanplate.errors import InputError
from cleanplate.locks import exclusive


def test_a_second_writer_is_refused_until_the_first_releases(tmp_path: Path) -> None:
    folder = tmp_path / "out"
    with exclusive(folder, ".lock", "another run is writing to out"):
        with pytest.raises(InputError) as err, exclusive(folder, ".lock", "another run is writing to out"):
            pass
        assert err.value.code == "busy" and str(err.value) == "another run is writing to out"
    with exclusive(folder, ".lock", "busy"):  # released: free again
        pass


def test_a_killed_holder_leaves_no_stale_lock(tmp_path: Path) -> None:
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from cleanplate.locks import exclusive
        with exclusive({str(tmp_path)!r}, ".lock", "busy"):
            print("held", flush=True)
            time.sleep(600)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(InputError), exclusive(tmp_path, ".lock", "busy"):
            pass
    finally:
        holder.kill()
        holder.wait()
    with exclusive(tmp_path, ".lock", "busy"):  # the kernel dropped the dead process's lock
        pass
