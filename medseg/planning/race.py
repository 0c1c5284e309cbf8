"""Choose between candidate plans inside the budget: successive halving on a held-out fold.

nnU-Net trains every configuration on five folds and then compares them (``find_best_configuration``)
— GPU-days. medseg races the alternatives a plan leaves open (region targets vs label-wise softmax,
...) the way hyperparameter searches do on a budget (successive halving, Jamieson & Talwalkar 2016):
every candidate trains on the other folds and is scored on fold 0, which none of them trains on;
the better half goes on with twice the time each, until one is left. The race spends a share of the
budget (:data:`RACE_SHARE`); the winner then trains on every case for the rest.

Every race run is an ordinary medseg run (its own folder, checkpoints, metrics), an MLflow child of
one ``race`` parent run, so the MLflow UI compares the candidates side by side.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from medseg.engine.runner import run_pipeline
from medseg.io.atomic import atomic_write_text
from medseg.planning.plan import Candidate, Plan
from medseg.planning.probe import with_overrides
from medseg.tracking.mlflow_tracker import MlflowTracker

log = logging.getLogger(__name__)

#: Share of the budget a race may spend; the winner trains on every case for the rest. A third keeps
#: two thirds for the model that is kept, while each of two candidates still trains for a sixth.
RACE_SHARE = 1 / 3
#: A race run shorter than this says little about the run that follows (warm-up, first validations).
MIN_RACE_RUN_MINUTES = 1.5
#: The split name a race run evaluates as ``test``: none, so a race never looks at a test split.
NO_TEST_SPLIT = "race:none"


@dataclass(frozen=True)
class RaceEntry:
    """One candidate's run in one rung of the race."""

    candidate: str
    rung: int
    minutes: float
    score: float | None
    run_id: str | None
    run_dir: str | None


@dataclass
class RaceResult:
    """The winner, every run of the race, the metric it was decided on and the time it took."""

    winner: Candidate
    metric: str
    entries: list[RaceEntry] = field(default_factory=list)
    minutes_used: float = 0.0
    parent_run_id: str | None = None

    def table(self) -> list[str]:
        """The race as Markdown rows (plan.md, the MLflow parent run)."""
        rows = [f"| rung | candidate | minutes | held-out fold 0 {self.metric} |", "|---|---|---|---|"]
        for e in self.entries:
            score = "failed" if e.score is None else f"{e.score:.4f}"
            rows.append(f"| {e.rung} | {e.candidate}{' (winner)' if e.candidate == self.winner.name else ''} | "
                        f"{e.minutes:.1f} | {score} |")
        return rows

    def as_dict(self) -> dict[str, Any]:
        return {"winner": self.winner.name, "metric": self.metric, "minutes_used": round(self.minutes_used, 2),
                "parent_run_id": self.parent_run_id, "entries": [asdict(e) for e in self.entries]}


def rung_minutes(n_candidates: int, minutes: float) -> list[tuple[int, float]]:
    """Successive halving's schedule: ``(candidates, minutes each)`` per rung. Every rung gets an
    equal share of ``minutes``; each rung keeps the better half (rounded up) of the one before."""
    if n_candidates < 2:
        return []
    rungs = math.ceil(math.log2(n_candidates))
    schedule, alive = [], n_candidates
    for _ in range(rungs):
        schedule.append((alive, minutes / rungs / alive))
        alive = math.ceil(alive / 2)
    return schedule


def raceable(count: int, race_minutes: float, min_run_minutes: float = MIN_RACE_RUN_MINUTES) -> bool:
    """Whether ``count`` candidates can race in ``race_minutes`` with every run at least ``min_run_minutes``."""
    schedule = rung_minutes(count, race_minutes)
    return bool(schedule) and min(minutes for _, minutes in schedule) >= min_run_minutes


def combine_candidates(structure: Sequence[Candidate], topology: Sequence[Candidate],
                       race_minutes: float) -> list[Candidate]:
    """What a plan races: every pairing of the structure alternatives (region targets vs labels) with
    the topology ones (the rules' network and patch vs the next richer one) when the race's time lets
    each run train :data:`MIN_RACE_RUN_MINUTES`; else the structure alternatives alone (the costlier
    mistake to leave to a rule), else the topology ones; the rules' own choice first."""
    if structure and topology:
        pairs = [Candidate(f"{s.name}+{t.name}", f"{s.description}; {t.description}", {**s.overrides, **t.overrides},
                           {**s.why_updates, **t.why_updates}) for s in structure for t in topology]
        if raceable(len(pairs), race_minutes):
            return pairs
    for group in (structure, topology):
        if len(group) > 1 and raceable(len(group), race_minutes):
            return list(group)
    return list(structure or topology)


def race_config(base: Mapping[str, Any], candidate: Candidate, minutes: float, out_dir: Path) -> dict[str, Any]:
    """A candidate's race run: trained on the other folds, scored on fold 0, no test split, no extras
    that cost time without informing the choice (HD95, overlay pictures, calibration)."""
    overrides: dict[str, Any] = {
        **candidate.overrides,
        "data.fold": 0, "data.train_folds": "others", "data.test_split": NO_TEST_SPLIT,
        "train.max_epochs": None, "train.max_minutes": round(minutes, 3), "train.folds": None, "output_dir": str(out_dir),
        "tracking.run_name": None}
    raw = with_overrides(base, overrides)
    validation = raw.setdefault("validation", {})
    for key, value in (("hd95", False), ("overlays", 0), ("calibrate", False)):
        if key in validation:
            validation[key] = value
    return raw


def race(plan: Plan, pipeline: Callable[[Any], None], validate: Callable[[dict[str, Any]], Any], *,
         share: float = RACE_SHARE, min_run_minutes: float = MIN_RACE_RUN_MINUTES, progress: bool = True,
         prepare_data: Callable[..., None] | None = None) -> RaceResult | None:
    """Race ``plan.candidates`` (successive halving on fold 0), then make the winner the plan.

    The plan's config becomes the winner's, with the time the race used taken off the budget;
    ``plan.why``, ``plan.notes`` and ``plan.race`` say what was raced and how it ended.

    Args:
        plan: a plan on a ``--folds`` manifest (``data.fold`` set) with two or more candidates.
        pipeline: the task's stages, ``pipeline(ctx)`` (see :func:`medseg.api.train`).
        validate: turns a config mapping into the task's validated config.
        share: the share of the budget the race may use.
        min_run_minutes: the shortest race run worth having (else no race).
        progress: progress bars.
        prepare_data: the task's data hook (see :func:`medseg.engine.runner.run_pipeline`).

    Returns:
        The race, or None when there is nothing to race (fewer than two candidates, no folds, or a
        budget too small for every candidate to train :data:`MIN_RACE_RUN_MINUTES`); the plan is
        then left as it was, with a note saying why.
    """
    budget = float(plan.config["train"]["max_minutes"]) * (plan.ensemble_folds or 1)  # a fold ensemble's members share it
    reason = _cannot_race(plan, budget * share, min_run_minutes)
    if reason:
        plan.notes.append(f"no race: {reason}")
        return None
    started = time.monotonic()
    metric = plan.selection_metric
    tracker = MlflowTracker(plan.config["tracking"]["uri"], plan.config["tracking"]["experiment"])
    race_dir = Path(plan.config["output_dir"]) / "race"
    parent_id = tracker.start("race", {"medseg.race": "successive halving", "medseg.race.metric": metric})
    result = RaceResult(winner=plan.candidates[0], metric=metric, parent_run_id=parent_id)
    alive = list(plan.candidates)
    try:
        for rung, (_, minutes) in enumerate(rung_minutes(len(alive), budget * share)):
            scored = [(_run_candidate(plan, c, rung, minutes, race_dir, parent_id, pipeline, validate, progress,
                                      prepare_data, result), c) for c in alive]
            ranked = sorted(scored, key=lambda sc: -math.inf if sc[0] is None else sc[0], reverse=True)
            alive = [c for _, c in ranked[:math.ceil(len(ranked) / 2)]]
        result.winner = alive[0]
        result.minutes_used = (time.monotonic() - started) / 60
        _log_race(tracker, result, race_dir)
        tracker.end("FINISHED")
    except BaseException:
        tracker.end("FAILED")
        raise
    _adopt_winner(plan, result, budget)
    return result


def _cannot_race(plan: Plan, race_minutes: float, min_run_minutes: float) -> str | None:
    if len(plan.candidates) < 2:
        return "the rules left one candidate"
    if plan.config.get("data", {}).get("fold") is None:
        return "the manifest has no cross-validation folds to hold one out"
    schedule = rung_minutes(len(plan.candidates), race_minutes)
    shortest = min(minutes for _, minutes in schedule)
    if shortest < min_run_minutes:
        return (f"{race_minutes:.1f} min for {len(plan.candidates)} candidates gives {shortest:.1f} min a run, "
                f"below {min_run_minutes:g}: the rules' choice ({plan.candidates[0].name}) trains for the whole "
                "budget")
    return None


def _run_candidate(plan: Plan, candidate: Candidate, rung: int, minutes: float, race_dir: Path, parent_id: str,
                   pipeline: Callable[[Any], None], validate: Callable[[dict[str, Any]], Any], progress: bool,
                   prepare_data: Callable[..., None] | None, result: RaceResult) -> float | None:
    """Train and score one candidate; a failing candidate scores None and the race goes on."""
    run_dir = race_dir / f"rung{rung}-{candidate.name}"
    log.info("race rung %d: %s for %.1f min (fold 0 held out)", rung, candidate.name, minutes)
    score: float | None = None
    run_id = None
    try:
        cfg = validate(race_config(plan.config, candidate, minutes, race_dir))
        summary_path = run_pipeline(cfg, pipeline, progress=progress, run_dir=run_dir, parent_run_id=parent_id,
                                    prepare_data=prepare_data)
        summary = json.loads(Path(summary_path).read_text()) if summary_path else {}
        run_id = summary.get("run_id")
        value = summary.get("metrics", {}).get(plan.selection_metric)
        score = None if value is None or math.isnan(float(value)) else float(value)
    except Exception as err:  # one candidate failing (memory, a numerical blow-up) does not end the race
        log.warning("race: %s failed (%s: %s); it is out", candidate.name, type(err).__name__, err)
    result.entries.append(RaceEntry(candidate.name, rung, round(minutes, 2), score, run_id, str(run_dir)))
    return score


def _log_race(tracker: MlflowTracker, result: RaceResult, race_dir: Path) -> None:
    for entry in result.entries:
        if entry.score is not None:
            tracker.log_metrics({f"race/{entry.candidate}/{result.metric}": entry.score}, step=entry.rung)
    tracker.set_tags({"medseg.race.winner": result.winner.name})
    path = atomic_write_text(race_dir / "race.json", json.dumps(result.as_dict(), indent=2))
    tracker.log_artifact(path)


def held_out_decisions(run_dir: Path) -> dict[str, Any]:
    """What a run scored on a held-out fold decided for the runs after it, as config overrides:
    the post-processing its evaluation chose (``postprocess.json``: smallest component kept per
    label). The final model's validation fold is trained on, so it cannot decide these itself."""
    path = run_dir / "postprocess.json"
    if not path.is_file():
        return {}
    chosen = json.loads(path.read_text()).get("min_component_size") or {}
    return {"postprocess.min_component_size": {str(k): int(v) for k, v in chosen.items()},
            "postprocess.search_min_component_size": None}


def _adopt_winner(plan: Plan, result: RaceResult, budget: float) -> None:
    winner = result.winner
    left = max(budget - result.minutes_used, 0.1 * budget)  # a race that overran still leaves the winner a tenth
    last = max(e.rung for e in result.entries)
    run_dir = next((e.run_dir for e in result.entries if e.rung == last and e.candidate == winner.name), None)
    decided = held_out_decisions(Path(run_dir)) if run_dir else {}
    if decided:
        sizes = decided["postprocess.min_component_size"]
        plan.why["postprocess.min_component_size"] = (
            f"chosen on the held-out fold by the race's winner: {sizes}" if sizes else
            "none: removing small components did not add Dice on the held-out fold")
        plan.why.pop("postprocess.search_min_component_size", None)
    weights = Path(run_dir) / "checkpoints" / "last.safetensors" if run_dir else None
    # The race run trained on folds 1..K-1: a fold ensemble's other members would start from weights that saw
    # their own validation fold, so only a model on every case goes on from them.
    if weights is not None and weights.is_file() and not plan.ensemble_folds:  # the winner goes on from its race
        decided["model.init_from"] = str(weights.resolve())
        plan.why["model.init_from"] = (
            f"the race's winner goes on from the weights its last race run trained on the other folds, so "
            f"the {result.minutes_used:.1f} min race is not lost to the model that is kept")
    plan.config = with_overrides(plan.config, {**winner.overrides, **decided})
    plan.why.update(winner.why_updates)
    plan.set_budget(left)
    plan.why["train.max_minutes"] = (f"--budget {budget:g} min, less the {result.minutes_used:.1f} min race "
                                     f"({len(plan.candidates)} candidates, won by {winner.name})"
                                     + (f", shared by the {plan.ensemble_folds} fold members" if plan.ensemble_folds else ""))
    scores = ", ".join(f"{e.candidate} {e.score:.4f}" if e.score is not None else f"{e.candidate} failed"
                       for e in result.entries if e.rung == last)
    plan.notes.append(f"race (successive halving, fold 0 held out, {result.metric}): {scores}; "
                      + (f"{winner.name} trains as a {plan.ensemble_folds}-fold ensemble" if plan.ensemble_folds else
                       f"{winner.name} trains on every case") + f" for the remaining {left:.1f} min"
                      + (", starting from its race weights" if "model.init_from" in decided else ""))
    plan.race = result.as_dict()


def candidates_summary(candidates: Sequence[Candidate]) -> str:
    return ", ".join(c.name for c in candidates)
