"""A run that notices: the health measures (``mls.health``) read at each log step against limits measured
on healthy and degraded runs (docs/study/health), with a warning in plain words, in the progress bar
and in the run's summary, or a stop (``--on-collapse stop``). Reading them costs one host sync per log
step, where Lightning already syncs to write the logs.
"""
from __future__ import annotations

from dataclasses import dataclass

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

# What a degraded run looks like (docs/study/health): past its first 100 steps and first epoch, a healthy run's
# queue spreads (‖mean(Q_z)‖ at most 0.70 from step 100 on, falling to 0.25-0.3 at the end: MoCo-v2, the
# paper's setting with a 2-epoch warm-up, the demo); Eq. 9 from the first step keeps the keys bunched in one
# direction (at least 0.80 from step 50 to step 130, most runs 0.85-0.92 to the end). The limit sits halfway.
# An effective rank under 2 is a collapse to a point or a line, whatever the budget.
MEAN_NORM_LIMIT = 0.75
RANK_LIMIT = 2.0
GRACE_STEPS = 100  # a fresh network's embeddings all point one way: the first steps are left alone
PATIENCE = 3  # consecutive log steps past a limit before it is reported


@dataclass(frozen=True)
class Finding:
    """What the run shows, in words a user can act on."""

    short: str  # for the progress bar
    message: str  # for the log and the summary


def assess(health: dict[str, float], method: str = "mls") -> Finding | None:
    """The finding one log step's measures support, if any (``method``: mls or mocov2, for the advice)."""
    rank, bunched = health.get("rank_z", float("inf")), health.get("mean_norm", 0.0)
    if method == "mls":
        advice = ("the likely cause is the extra loss's negative terms pushing every query away from the same "
                  "mean key while the embeddings are still bunched (Eq. 9 from the first step); "
                  "--preset recommended (balanced BCE at λ 0.25 from epoch 2) or --extra-start-epoch 2 avoids it")
    else:
        advice = "lower the learning rate, or check that the images differ from one another"
    if rank < RANK_LIMIT:
        return Finding("collapsed", f"the embedding has collapsed: Q_z spans an effective rank of {rank:.1f}; {advice}")
    if bunched > MEAN_NORM_LIMIT:
        return Finding("not spreading", (
            f"the embedding is not spreading: the queue's keys stay bunched in one direction (‖mean(Q_z)‖ = "
            f"{bunched:.2f}, above {MEAN_NORM_LIMIT}; healthy runs measured 0.25-0.70 past step {GRACE_STEPS}), "
            f"which left the features 17-19 mAP worse than MoCo-v2's in docs/study/health; {advice}"))
    return None


class HealthWatch(L.Callback):
    """Reads the logged health measures at each log step and reports a degraded embedding once.

    ``on_collapse="stop"`` ends the run (after its checkpoint) instead of training on.
    """

    def __init__(self, on_collapse: str = "warn"):
        self.on_collapse = on_collapse
        self.finding: Finding | None = None
        self.judged = 0  # log steps read past the grace period
        self._streak = 0

    @property
    def verdict(self) -> str:
        """The run's health in one line, for its summary."""
        if self.finding is not None:
            return f"health: {self.finding.message}"
        if self.judged < PATIENCE:
            return (f"health: not judged (the watch reads the embedding's spread from step {GRACE_STEPS} or the "
                    "second epoch on; mls plot draws it)")
        return "health: no sign of a collapsing or bunched embedding (mls plot draws the measures)"

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        logged = pl_module.pending_health  # set by the step when it measured health (every log step)
        pl_module.pending_health = None
        if logged is None or self.finding is not None:
            return
        if trainer.global_step < max(GRACE_STEPS, pl_module.hparams.steps_per_epoch):
            return
        self.judged += 1
        finding = assess({k: float(v) for k, v in logged.items()}, pl_module.model.config.method)
        self._streak = self._streak + 1 if finding else 0
        if finding and self._streak >= PATIENCE:
            self.finding = finding
            rank_zero_info(f"\nmls: warning at step {trainer.global_step}: {finding.message}")
            if self.on_collapse == "stop":
                trainer.should_stop = True
                rank_zero_info("mls: stopping the run (--on-collapse stop); its last checkpoint is written")
