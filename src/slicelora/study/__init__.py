"""Studies: a grid of runs (variant x sequence x seed) with shared work, and its plan."""

from .runner import read_study, run_study
from .spec import Cell, Study, load_study, parse_study

__all__ = ["Cell", "Study", "load_study", "parse_study", "read_study", "run_study"]
