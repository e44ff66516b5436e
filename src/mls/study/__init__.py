"""``mls study``: the paper's ablations as one resumable, multi-seed experiment (grids, runner, report)."""
from mls.study.grids import BUDGETS, GRIDS, Budget, grid_cells
from mls.study.runner import study

__all__ = ["BUDGETS", "GRIDS", "Budget", "grid_cells", "study"]
