"""A run that notices: the health measures (``mls.method.health``) read at each log step, each condition reported
when it sets in and again when it clears, in the log, the progress bar and the run's summary, or a stop
(``--on-collapse stop``). Reading them costs one host sync per log step, where Lightning already syncs to
write the logs.

Each condition compares the run with itself, against a limit that follows from what it states, not from a
set of runs (docs/study/watch has the rule's registration and its out-of-sample check):

- **collapsed**: the effective rank of ``Q_z`` (RankMe) is under 2: the keys span a point or a line.
- **extra loss dominates** (MLS only, once λ > 0): the extra loss's negative terms push the queries harder
  than InfoNCE does, ``λ · grad_extra_neg > grad_infonce`` (both the mean norm of a loss's gradient on z1
  along the sphere). Past that point the embedding is shaped by a push that, on keys that are still alike,
  is the same for every query (``σ̄ · mean(Q_z) / τ``), rather than by the contrast that spreads them.

A condition is reported after ``PATIENCE`` log steps in a row and cleared after ``PATIENCE`` in a row
without it.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

RANK_LIMIT = 2.0  # an effective rank under 2: one or two directions, a collapse by definition
FORCE_LIMIT = 1.0  # the extra loss's negative terms and InfoNCE push equally hard
PATIENCE = 3  # consecutive log steps with (or without) a condition before it is reported (or cleared)


@dataclass(frozen=True)
class Finding:
    """One condition at one log step, in words a user can act on."""

    short: str  # for the progress bar
    message: str  # for the log and the summary
    value: float  # the measure the condition is judged on, for the summary's "at most" and "at the end"


def force_ratio(health: dict[str, float]) -> float | None:
    """``λ · grad_extra_neg / grad_infonce`` at one log step, or None without an extra loss (MoCo-v2, λ = 0)."""
    weight = health.get("extra_weight", 0.0)
    if weight <= 0 or "grad_extra_neg" not in health or health.get("grad_infonce", 0.0) <= 0:
        return None
    return weight * health["grad_extra_neg"] / health["grad_infonce"]


def assess(health: dict[str, float], method: str = "mls") -> list[Finding]:
    """The conditions one log step's measures show (``method``: mls or mocov2, for the advice)."""
    found = []
    rank = health.get("rank_z", float("inf"))
    if rank < RANK_LIMIT:
        tips = "a lower learning rate" + (", a smaller --extra-weight" if method == "mls" else "")
        found.append(Finding("collapsed", (
            f"the embedding has collapsed: the keys in Q_z span an effective rank of {rank:.1f} (under {RANK_LIMIT:g}: "
            f"a point or a line); check that the images differ from one another; things to try: {tips}"), rank))
    ratio = force_ratio(health) if method == "mls" else None
    if ratio is not None and ratio > FORCE_LIMIT:
        found.append(Finding("extra loss dominates", (
            f"the extra loss's negative terms push the queries harder than InfoNCE does (λ x their force "
            f"{health['extra_weight'] * health['grad_extra_neg']:.2f} against InfoNCE's {health['grad_infonce']:.2f}, "
            f"a ratio of {ratio:.2f}); while they do, the embedding follows a push that is alike for every query "
            f"rather than the contrast that spreads it (docs/study/health); a smaller --extra-weight, or a later "
            f"--extra-start-epoch, weakens it; mls plot draws the forces"), ratio))
    return found


@dataclass
class Episode:
    """A reported condition: when it was reported, when it cleared (None: still on), its worst value."""

    first: Finding
    step: int
    worst: float
    cleared: int | None = None


@dataclass
class _Track:
    """One condition's streaks of log steps with and without it, and its episodes."""

    streak_on: int = 0
    streak_off: int = 0
    episodes: list[Episode] = field(default_factory=list)

    @property
    def active(self) -> Episode | None:
        return self.episodes[-1] if self.episodes and self.episodes[-1].cleared is None else None


class HealthWatch(L.Callback):
    """Reads the logged health measures at each log step; reports each condition as it sets in and clears.

    ``on_collapse="stop"`` ends the run (after its checkpoint) when a condition is reported instead of
    training on.
    """

    def __init__(self, on_collapse: str = "warn"):
        self.on_collapse = on_collapse
        self.judged = 0  # log steps read
        self.tracks: dict[str, _Track] = {}
        self.last: dict[str, float] = {}

    @property
    def active(self) -> list[Episode]:
        """The conditions reported and not cleared."""
        return [t.active for t in self.tracks.values() if t.active is not None]

    @property
    def status(self) -> str | None:
        """For the progress bar: the conditions now on, or "cleared" once every reported one has cleared."""
        if self.active:
            return ", ".join(e.first.short for e in self.active)
        return "cleared" if self.tracks and any(t.episodes for t in self.tracks.values()) else None

    @property
    def verdict(self) -> str:
        """The run's health at its end, and any condition reported earlier, for its summary."""
        if self.judged < PATIENCE:
            return "health: not judged (fewer log steps than the watch needs; mls plot draws the measures)"
        episodes = sorted((e for t in self.tracks.values() for e in t.episodes), key=lambda e: e.step)
        now = [e for e in episodes if e.cleared is None]
        lines = ["health: " + ("; ".join(f"at the end, {e.first.message}" for e in now) if now else
                              "at the end, no sign of a collapsed embedding or of an extra loss stronger than InfoNCE")]
        for e in episodes:
            if e.cleared is not None:
                lines.append(f"  earlier: {e.first.short} from step {e.step} to step {e.cleared} (worst {e.worst:.2f}), "
                             "then cleared")
        return "\n".join(lines) + ("" if now else " (mls plot draws the measures)")

    def observe(self, step: int, health: dict[str, float], method: str) -> list[str]:
        """Judge one log step; return the lines to print (a condition reported or cleared)."""
        self.judged += 1
        self.last = health
        found = {f.short: f for f in assess(health, method)}
        lines = []
        for short in sorted(set(found) | set(self.tracks)):
            track = self.tracks.setdefault(short, _Track())
            if short in found:
                track.streak_on, track.streak_off = track.streak_on + 1, 0
                if track.active is not None:  # the lowest rank, the highest force ratio
                    worse = min if short == "collapsed" else max
                    track.active.worst = worse(track.active.worst, found[short].value)
                elif track.streak_on >= PATIENCE:
                    track.episodes.append(Episode(found[short], step, found[short].value))
                    lines.append(f"mls: warning at step {step}: {found[short].message}")
            else:
                track.streak_on, track.streak_off = 0, track.streak_off + 1
                if track.active is not None and track.streak_off >= PATIENCE:
                    track.active.cleared = step
                    lines.append(f"mls: cleared at step {step}: {short} (reported at step {track.episodes[-1].step})")
        return lines

    def state_dict(self) -> dict:
        """What the watch has seen, kept in the checkpoint: a resumed run's summary still names earlier episodes."""
        return {"judged": self.judged, "tracks": {name: asdict(track) for name, track in self.tracks.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.judged = state["judged"]
        self.tracks = {}
        for name, track in state["tracks"].items():
            episodes = [Episode(Finding(**e["first"]), e["step"], e["worst"], e["cleared"]) for e in track["episodes"]]
            self.tracks[name] = _Track(track["streak_on"], track["streak_off"], episodes)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        logged = pl_module.pending_health  # set by the step when it measured health (every log step)
        pl_module.pending_health = None
        if logged is None:
            return
        health = {k: float(v) for k, v in logged.items()}
        before = len(self.active)
        for line in self.observe(trainer.global_step, health, pl_module.model.config.method):
            rank_zero_info("\n" + line)
        if self.on_collapse == "stop" and len(self.active) > before:
            trainer.should_stop = True
            rank_zero_info("mls: stopping the run (--on-collapse stop); its last checkpoint is written")
