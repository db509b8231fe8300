"""Atomic writes: files get the permissions any other new file gets under the process's umask."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


@pytest.mark.parametrize("umask", [0o002, 0o022, 0o077])
def test_written_files_honour_the_umask(tmp_path, umask):
    script = (f"import os; os.umask({umask:#o}); from slicelora.io import write_json, write_text; import sys;"
              "write_text(sys.argv[1] + '/a.txt', 'x'); write_json(sys.argv[1] + '/b.json', {}); "
              "open(sys.argv[1] + '/plain.txt', 'w').close()")
    subprocess.run([sys.executable, "-c", script, str(tmp_path)], check=True, timeout=120)
    modes = {name: os.stat(tmp_path / name).st_mode & 0o777 for name in ("a.txt", "b.json", "plain.txt")}
    assert modes == dict.fromkeys(modes, 0o666 & ~umask)


def test_remove_temporaries_deletes_only_what_killed_writers_left(tmp_path):
    from slicelora.io import remove_temporaries

    stage = tmp_path / "stages" / "01"
    (stage / "adapter.tmp").mkdir(parents=True)
    (stage / "adapter.tmp" / "adapter_model.safetensors").write_bytes(b"half")
    (stage / ".init.json.abc123.tmp").write_text("{")
    kept = [stage / "init.json", stage / "notes.tmp", tmp_path / "config.json"]
    for path in kept:
        path.write_text("{}")
    remove_temporaries(tmp_path)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file()) == sorted(
        p.relative_to(tmp_path) for p in kept)
    assert not (stage / "adapter.tmp").exists()
