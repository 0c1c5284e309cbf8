"""Whether pretraining on unlabelled scans pays at a budget, and what share of it it gets.

Pretraining (``medseg pretrain``, a masked autoencoder) and the fine-tuning it starts share one
clock, so every pretraining step is a step the fine-tuning does not take. The measured evidence
(``benchmarks/results/pretrain.md``) is plain about it: at a 3-minute CPU budget, half of it spent on
pretraining lost to training from scratch at every labelled-case count, while the same pretrained
start given the whole budget to fine-tune (the pretraining paid elsewhere) did as well or better. So
pretraining is paid only from the steps the fine-tuning does not need: the planner's step goal (the
steps a model needs to converge, :mod:`medseg.planning.final_model` reasons the same way) comes
first, and only the surplus of the budget beyond it, at most :data:`MAX_PRETRAIN_SHARE`, pretrains.
It must also be worth having: at least :data:`MIN_PRETRAIN_STEPS` steps, and unlabelled scans that
outnumber the labelled ones by :data:`UNLABELLED_FACTOR` (with few extra images the supervised run
already sees most of what the encoder would learn from). The two thresholds are judgement, not
measurements of this repository: the benchmark measured the losing side of the rule, not its edge.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Pretrain only when the unlabelled scans are at least this many times the labelled training cases.
UNLABELLED_FACTOR = 2.0
#: The fine-tuning is what is scored: pretraining never takes more than this share of the budget.
MAX_PRETRAIN_SHARE = 0.5
#: Below this many steps a masked autoencoder has hardly left its initialisation (the benchmark's
#: 1.5-minute pretraining stopped after one epoch); a quarter of the segmentation step goal.
MIN_PRETRAIN_STEPS = 5_000


@dataclass(frozen=True)
class PretrainingDecision:
    """The decision: ``share`` of the budget to pretraining (0: none), the steps each side gets, why.

    Steps are the probe's training steps of the planned network; a pretraining step trains the same
    network on the same patch and batch, so it is counted as costing the same.
    """

    share: float
    pretrain_steps: int
    finetune_steps: int | None
    why: str

    @property
    def pretrains(self) -> bool:
        return self.share > 0


def choose_pretraining(unlabelled: int, labelled: int, steps_in_budget: int | None, step_goal: int | None,
                       members: int = 1) -> PretrainingDecision:
    """Pretrain when the unlabelled scans outnumber the labelled ones by :data:`UNLABELLED_FACTOR` and
    the budget leaves the fine-tuning its step goal with at least :data:`MIN_PRETRAIN_STEPS` to spare.

    Args:
        unlabelled: scans without labels the user gave.
        labelled: labelled cases the fine-tuning trains on.
        steps_in_budget: training steps the whole budget buys here (None: no probe timed one).
        step_goal: the steps the planner wants the fine-tuning to get (None: the planner has no goal).
        members: models the fine-tuning trains (a fold ensemble's members each need the goal).

    Returns:
        The :class:`PretrainingDecision`; ``share`` 0 when pretraining does not pay.
    """
    counts = f"{unlabelled} unlabelled scan(s) beside {labelled} labelled case(s)"
    if unlabelled == 0:
        return PretrainingDecision(0.0, 0, steps_in_budget, "no unlabelled scans: nothing to pretrain on")
    if unlabelled < UNLABELLED_FACTOR * labelled:
        return PretrainingDecision(0.0, 0, steps_in_budget, f"no pretraining: {counts}, fewer than "
                                   f"{UNLABELLED_FACTOR:g}x as many; the fine-tuning already sees most of the images")
    if steps_in_budget is None or step_goal is None:
        return PretrainingDecision(0.0, 0, steps_in_budget, f"no pretraining: {counts}, but no probe timed a "
                                   "training step, so nothing says the fine-tuning would keep its step goal")
    needed = step_goal * members
    pretrain_steps = min(int(MAX_PRETRAIN_SHARE * steps_in_budget), steps_in_budget - needed)
    whose = f"the {members} fold members' {step_goal:,} each" if members > 1 else f"the {step_goal:,} a model needs"
    if pretrain_steps < MIN_PRETRAIN_STEPS:
        spare = max(0, steps_in_budget - needed)
        return PretrainingDecision(0.0, 0, steps_in_budget, f"no pretraining: {counts}, but the budget buys "
                                   f"~{steps_in_budget:,} steps and the fine-tuning needs {whose}; the ~{spare:,} left "
                                   f"are under the {MIN_PRETRAIN_STEPS:,} a pretraining needs (pretraining charged to a "
                                   "budget the fine-tuning needs lost: benchmarks/results/pretrain.md)")
    share = pretrain_steps / steps_in_budget
    return PretrainingDecision(share, pretrain_steps, steps_in_budget - pretrain_steps,
                               f"pretrain for {share:.0%} of the budget (~{pretrain_steps:,} steps): {counts}, and "
                               f"the fine-tuning keeps ~{steps_in_budget - pretrain_steps:,} steps, at least {whose}")
