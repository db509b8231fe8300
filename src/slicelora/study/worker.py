"""`python -m slicelora.study.worker STUDY SESSION`: one worker process of `run_study(..., workers=N)`."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from accelerate import Accelerator

from .runner import read_study, run_cells


def main(argv: list[str]) -> None:
    out, session = Path(argv[0]), argv[1]
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    failed = run_cells(read_study(out), out, session=session, accelerator=accelerator,
                       log=lambda line: print(line, flush=True))
    accelerator.end_training()
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main(sys.argv[1:])
