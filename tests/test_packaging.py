"""The built wheel carries the task data: installed outside the repository, `slicelora tasks` finds it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_installed_wheel_lists_the_shipped_tasks(tmp_path):
    source = tmp_path / "source"  # a copy, so the build leaves no build/ or egg-info in the repository
    shutil.copytree(REPO / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "dist"),
                    str(source)], check=True, capture_output=True, timeout=300)
    wheel = next((tmp_path / "dist").glob("slicelora-*.whl"))
    target = tmp_path / "installed"  # the wheel alone; torch and the rest come from this interpreter
    subprocess.run([*pip, "install", "--no-deps", "--no-compile", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    shutil.rmtree(source)  # nothing may be found through the source tree
    env = {**os.environ, "PYTHONPATH": str(target), "OMP_NUM_THREADS": "1"}
    where = subprocess.run([sys.executable, "-c", "import slicelora; print(slicelora.__file__)"], cwd=tmp_path,
                           env=env, capture_output=True, text=True, check=True)
    assert Path(where.stdout.strip()).is_relative_to(target)
    listed = subprocess.run([str(target / "bin" / "slicelora"), "tasks"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert listed.returncode == 0, listed.stderr
    names = listed.stdout.split()
    assert "task363_sst2_polarity_classification" in names and "MeetingBank" in names and len(names) == 23
