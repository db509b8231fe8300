"""Studies on a tiny model: the grid end to end, shared cells bitwise equal to cells run alone, resume after kills,
and every bad study file refused before any model is loaded."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest
import yaml

from conftest import kill_at
from slicelora.errors import ConfigError, RunStateError
from slicelora.loop.stages import run
from slicelora.study import load_study, parse_study, run_study
from slicelora.study.plan import count_work, wall_seconds

# 2 variants x 2 seeds x 2 tasks. SLICE's gate is open (tau = 1), so its stage 2 projects and differs from
# LoRA-GA's, while its stage 1 (no replay yet) is LoRA-GA's and is shared.
def spec(model: Path) -> dict:
    return {
        "base": {"model": str(model), "adapter": {"rank": 4}, "init": {"batches": 2, "batch_size": 4, "replay_buffer": 8},
                 "train": {"epochs": 1, "batch_size": 4, "grad_accum": 2, "max_length": 96, "max_examples": 12},
                 "eval.examples": 3, "eval.max_new_tokens": 3, "general.enabled": False},
        "variants": {"lora_ga": {"init.method": "lora_ga"}, "slice-open": {"init.method": "slice", "init.gate": 1.0}},
        "sequences": {"two": ["363", "1687"]},
        "seeds": [1, 2],
        "reference": "lora_ga",
    }


@pytest.fixture(scope="module")
def study_run(tiny_folder, tmp_path_factory) -> Path:
    return run_study(parse_study(spec(tiny_folder)), tmp_path_factory.mktemp("study") / "out")


def files(folder: Path) -> dict[str, bytes]:
    """Every file of a run folder but timing.json (wall times), by relative path."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != "timing.json"}


def test_shared_cells_are_bitwise_the_cells_run_alone(tiny_folder, study_run, tmp_path):
    study = parse_study(spec(tiny_folder))
    shared = {c.dir: json.loads((study_run / c.dir / "stages" / "01" / "timing.json").read_text())["shared"]
              for c in study.cells()}
    assert shared == {c.dir: c.variant == "slice-open" for c in study.cells()}  # stage 1 copied from LoRA-GA's
    fired = json.loads((study_run / "cells/two/slice-open/seed1/stages/02/init.json").read_text())["surgery"]["fired"]
    stage2 = json.loads((study_run / "cells/two/slice-open/seed1/stages/02/timing.json").read_text())
    assert fired and not stage2["shared"] and stage2["gradient_sets_from_cache"] == ["current"]
    for cell in study.cells():
        alone = run(study.config(cell), tmp_path / cell.dir)
        assert files(study_run / cell.dir) == files(alone), cell


def test_plan_counts_the_shared_stages(tiny_folder):
    grid = spec(tiny_folder)
    grid["variants"]["slice-half"] = {"init.method": "slice", "init.gate": 1.0, "init.strength": 0.5}
    work = count_work(parse_study(grid))
    # predicted from settings: the two SLICE variants share their stage 1 (no replay, so c and tau unused); that
    # it equals LoRA-GA's is known only from the factors, at run time
    assert sum(work.stages.values()) == 12 and len(work.stages) == 10
    # groups partition the grid: their work adds up to the whole
    study = parse_study(grid)
    parts = [count_work(study.group(seq, seed)) for seq, seed in study.groups()]
    assert sum(len(p.stages) for p in parts) == len(work.stages)
    assert sum(p.train_batches for p in parts) == work.train_batches


def test_wall_time_follows_the_groups_schedule():
    """Workers take whole groups in order: 3 equal groups on 2 workers take 2 groups' time, not 1.5."""
    assert wall_seconds([10.0, 10.0, 10.0], 2) == 20.0
    assert wall_seconds([10.0, 10.0, 10.0], 3) == 10.0
    assert wall_seconds([30.0, 10.0, 10.0, 10.0], 2) == 30.0  # the short groups go to the free worker
    assert wall_seconds([5.0], 8) == 5.0


WORKER = ("import sys; from slicelora.study import parse_study, run_study; import json;"
          "run_study(parse_study(json.loads(sys.argv[2])), sys.argv[1], resume=True)")


@pytest.mark.slow
def test_killed_study_resumes_to_identical_files(tiny_folder, study_run, tmp_path):
    rng = random.Random(11)
    out = tmp_path / "killed"
    command = [sys.executable, "-c", WORKER, str(out), json.dumps(spec(tiny_folder))]
    kills = kill_at(command, [rng.uniform(3, 6), rng.uniform(3, 8), rng.uniform(3, 8)])
    run_study(parse_study(spec(tiny_folder)), out, resume=True)
    assert kills >= 1
    for cell in parse_study(spec(tiny_folder)).cells():
        assert files(out / cell.dir) == files(study_run / cell.dir), cell


def test_study_folder_guards(tiny_folder, study_run, tmp_path):
    other = spec(tiny_folder)
    other["seeds"] = [1, 3]
    other["base"]["train"]["lr"] = 1e-3
    with pytest.raises(RunStateError, match=r"base\.train\.lr, seeds"):
        run_study(parse_study(other), study_run, resume=True)
    with pytest.raises(RunStateError, match="--resume"):
        run_study(parse_study(spec(tiny_folder)), study_run)
    with pytest.raises(RunStateError, match="is a run folder"):
        run_study(parse_study(spec(tiny_folder)), study_run / "cells/two/lora_ga/seed1", resume=True)


@pytest.mark.parametrize("change, message", [
    (lambda s: s.update(varaints=s.pop("variants")), r"unknown key 'varaints'.*Did you mean 'variants'"),
    (lambda s: s["variants"]["lora_ga"].update({"init.methd": "x"}), r"init\.methd.*Did you mean init\.method"),
    (lambda s: s.update(variants={}), r"'variants' is missing or empty"),
    (lambda s: s.update(seeds=[]), r"'seeds' is missing or empty"),
    (lambda s: s.update(reference="slice"), r"reference 'slice' is not a variant.*Did you mean 'slice-open'"),
    (lambda s: s.update(seeds=[1, "two"]), r"seeds must be integers, got 'two'"),
    (lambda s: s.update(seeds=[1.5]), r"seeds must be integers"),
    (lambda s: s.update(seeds=[1, 1]), r"repeat"),
    (lambda s: s["variants"]["lora_ga"].update({"seed": 3}), r"'seed' is set by the grid"),
    (lambda s: s["variants"]["lora_ga"].update({"init.method": "slyce"}), r"init\.method='slyce'"),
    (lambda s: s["sequences"].update(bad="no-such-sequence"), r"sequence 'bad'.*unknown sequence"),
])
def test_bad_study_files_are_refused_before_loading(tiny_folder, change, message):
    data = spec(tiny_folder)
    change(data)
    with pytest.raises(ConfigError, match=message):
        parse_study(data)


def test_duplicate_variant_names_are_refused(tiny_folder, tmp_path):
    text = yaml.safe_dump(spec(tiny_folder), sort_keys=False)
    text = text.replace("variants:\n", "variants:\n  lora_ga:\n    init.method: vanilla\n", 1)
    path = tmp_path / "dup.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=r"'lora_ga' is given twice"):
        load_study(path)


def test_a_failing_cell_does_not_stop_the_others(tiny_folder, tmp_path):
    grid = spec(tiny_folder)
    grid["variants"] = {"diverges": {"init.method": "lora_ga", "train.lr": 1e30, "train.warmup_ratio": 0},
                        "lora_ga": {"init.method": "lora_ga"}}  # the failing cell runs first
    grid["seeds"] = [1]
    grid["reference"] = "lora_ga"
    lines = []
    with pytest.raises(RunStateError, match=r"1 cell\(s\) failed: cells/two/diverges/seed1"):
        run_study(parse_study(grid), tmp_path / "out", log=lines.append)
    assert any("diverges/seed1: FAILED" in line and "diverged" in line for line in lines)
    assert (tmp_path / "out" / "cells/two/lora_ga/seed1/stages/02/scores.json").is_file()
