"""The rule that decides whether a plan pretrains on unlabelled scans, at its boundaries (known answers)."""

from __future__ import annotations

import pytest

from medseg.planning.pretraining_budget import (
    MAX_PRETRAIN_SHARE,
    MIN_PRETRAIN_STEPS,
    UNLABELLED_FACTOR,
    choose_pretraining,
)

GOAL = 20_000


def test_no_unlabelled_scans_no_pretraining() -> None:
    decision = choose_pretraining(0, 10, 1_000_000, GOAL)
    assert not decision.pretrains and decision.share == 0 and "nothing to pretrain on" in decision.why


def test_unlabelled_scans_must_outnumber_the_labelled_by_the_factor() -> None:
    assert UNLABELLED_FACTOR == 2.0
    below = choose_pretraining(19, 10, 1_000_000, GOAL)
    assert not below.pretrains and "19 unlabelled" in below.why and "fewer than 2x" in below.why
    assert choose_pretraining(20, 10, 1_000_000, GOAL).pretrains  # exactly the factor is enough


def test_without_a_probe_nothing_says_the_fine_tuning_keeps_its_goal() -> None:
    assert not choose_pretraining(100, 5, None, GOAL).pretrains
    decision = choose_pretraining(100, 5, 1_000_000, None)
    assert not decision.pretrains and "no probe" in decision.why


def test_pretraining_is_paid_from_the_steps_beyond_the_goal_and_needs_its_minimum() -> None:
    assert MIN_PRETRAIN_STEPS == 5_000
    edge = choose_pretraining(100, 5, GOAL + MIN_PRETRAIN_STEPS, GOAL)  # 25,000 steps: exactly 5,000 to spare
    assert edge.pretrains and edge.pretrain_steps == 5_000 and edge.finetune_steps == GOAL
    assert edge.share == pytest.approx(0.2)
    short = choose_pretraining(100, 5, GOAL + MIN_PRETRAIN_STEPS - 1, GOAL)
    assert not short.pretrains and short.finetune_steps == 24_999 and "~4,999 left" in short.why
    assert "benchmarks/results/pretrain.md" in short.why


def test_a_3_minute_cpu_budget_does_not_pretrain() -> None:
    # the measured case: a 3-minute budget buys a few thousand steps here, below the fine-tuning's goal
    decision = choose_pretraining(260, 5, 3_000, GOAL)
    assert not decision.pretrains and "~0 left" in decision.why


def test_a_large_budget_gives_pretraining_at_most_half() -> None:
    assert MAX_PRETRAIN_SHARE == 0.5
    decision = choose_pretraining(100, 5, 100_000, GOAL)
    assert decision.share == 0.5 and decision.pretrain_steps == 50_000 and decision.finetune_steps == 50_000
    assert "50%" in decision.why and "100 unlabelled scan(s) beside 5 labelled" in decision.why


def test_every_fold_member_keeps_the_goal() -> None:
    members = 2
    edge = choose_pretraining(100, 5, members * GOAL + MIN_PRETRAIN_STEPS, GOAL, members)
    assert edge.pretrains and edge.finetune_steps == members * GOAL and "2 fold members" in edge.why
    assert not choose_pretraining(100, 5, members * GOAL + MIN_PRETRAIN_STEPS - 1, GOAL, members).pretrains
