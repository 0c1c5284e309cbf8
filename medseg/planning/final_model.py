"""What the plan's final training is: one model on every case, or nnU-Net's fold ensemble.

nnU-Net's final model is the ensemble of its five cross-validation folds, each trained for the full
schedule (1000 epochs) on four fifths of the cases; its cross-validation scores come for free and
decide the post-processing. A budget changes the trade: K members share the clock, so each gets a
K-th of the steps. Below the steps a network needs to converge (the planner's goal), K half-trained
members lose to one model trained on every case for the whole budget; at or above it, the ensemble is
what nnU-Net would ship, and it costs nothing in convergence. So the rule: a K-fold ensemble when each
member still reaches the step goal, else one model on every case.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FinalTraining:
    """The decision: ``folds`` members (None: one model on every case), the steps each gets, why."""

    folds: int | None
    steps_each: int | None
    why: str

    @property
    def ensemble(self) -> bool:
        return self.folds is not None


def choose_final_training(folds: int, steps_in_budget: int | None, step_goal: int | None) -> FinalTraining:
    """A ``folds``-member cross-validation ensemble when each member still gets ``step_goal`` steps of
    the ``steps_in_budget`` the probe measured; else one model on every case.

    Args:
        folds: the manifest's cross-validation folds (at least 2).
        steps_in_budget: training steps the whole budget buys on this machine (None: no probe timed one).
        step_goal: the steps the planner wants a model to get (None: the planner has no goal).
    """
    if steps_in_budget is None or step_goal is None:
        return FinalTraining(None, steps_in_budget, "no probe timed a training step, so nothing says a "
                             f"{folds}-fold ensemble's members would each train long enough: one model on every case")
    each = steps_in_budget // folds
    if each >= step_goal:
        return FinalTraining(folds, each, f"{folds}-fold ensemble (nnU-Net's final model): each member still gets "
                             f"~{each:,} steps, at least the {step_goal:,} a model needs here, and the folds' "
                             "validations are real cross-validation")
    return FinalTraining(None, steps_in_budget, f"one model on every case for the whole budget (~{steps_in_budget:,} "
                         f"steps): a {folds}-fold ensemble would give each member ~{each:,}, below the {step_goal:,} a "
                         "model needs here")
