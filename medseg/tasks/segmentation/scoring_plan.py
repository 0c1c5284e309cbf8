"""Whether a plan scores its val and test splits with mirroring TTA (``validation.tta``).

nnU-Net always scores with test-time mirroring: 2^dims predictions per case. Its runs take days,
so that costs nothing in proportion; under a budget of minutes it can cost several times the
training itself (a 20-second plan on ten hippocampus scans spent two minutes scoring five cases
eight times each). The plan keeps the mirroring when the probe's step time says it adds at most
:data:`MIRRORED_SCORING_SHARE` of the budget, and otherwise scores each case once and says so.
Training still flips every axis either way, so ``medseg predict --tta`` stays available.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from medseg.planning.fingerprint import CaseFingerprint, Fingerprint

#: Mirrored scoring may add at most this share of the budget's time to the run.
MIRRORED_SCORING_SHARE = 0.25
#: One training step is a forward and a backward pass (about two forwards) over the batch, so one
#: window's forward pass costs about a third of a step per patch of the batch.
FORWARD_SHARE_OF_STEP = 1.0 / 3.0
#: With no "val" split in the manifest (folds), the validation fold is one of five.
DEFAULT_FOLDS = 5


@dataclass(frozen=True)
class ScoringDecision:
    """``tta``: the value for ``validation.tta`` (None: auto, i.e. mirror what training flipped)."""

    tta: bool | None
    why: str
    mirrored_seconds: float | None = None


def windows_per_case(shape: Sequence[float], patch: Sequence[int], overlap: float) -> int:
    """Sliding windows over one image, as MONAI's ``sliding_window_inference`` lays them out."""
    count = 1
    for size, width in zip(shape, patch):
        interval = max(1, int(width * (1.0 - overlap)))
        count *= 1 if size <= width else math.ceil((size - width) / interval) + 1
    return count


def scored_shapes(fp: Fingerprint, spacing: Sequence[float]) -> list[list[float]]:
    """The shapes at the target spacing of the cases the evaluate stage scores: val and test (a
    fold's share of the rest when the manifest has folds instead of a val split)."""
    target = np.asarray(spacing, dtype=float)

    def at_target(case: CaseFingerprint) -> list[float]:
        return list(np.asarray(case.shape, dtype=float) * np.asarray(case.spacing, dtype=float) / target)

    scored = [at_target(c) for c in fp.cases if c.split in ("val", "test")]
    if not any(c.split == "val" for c in fp.cases):
        rest = [at_target(c) for c in fp.cases if c.split != "test"]
        scored += rest[: round(len(rest) / DEFAULT_FOLDS)]
    return scored


def decide(fp: Fingerprint, spacing: Sequence[float], patch: Sequence[int], overlap: float,
           step_seconds: float | None, batch_size: int, budget_minutes: float) -> ScoringDecision:
    """Mirror at scoring when its estimated time fits :data:`MIRRORED_SCORING_SHARE` of the budget."""
    if not step_seconds:
        return ScoringDecision(None, "val and test scored with mirroring TTA (nnU-Net's default; not probed, so "
                                     "its cost was not estimated)")
    mirrors = 2 ** len(patch)
    window_s = step_seconds * FORWARD_SHARE_OF_STEP / batch_size
    windows = sum(windows_per_case(shape, patch, overlap) for shape in scored_shapes(fp, spacing))
    mirrored = windows * mirrors * window_s
    allowed = budget_minutes * 60.0 * MIRRORED_SCORING_SHARE
    if mirrored <= allowed:
        return ScoringDecision(None, f"val and test scored with mirroring TTA as nnU-Net (~{mirrored:.0f} s for "
                                     f"{windows} windows x {mirrors} mirrorings, within {MIRRORED_SCORING_SHARE:.0%} "
                                     "of the budget)", mirrored)
    return ScoringDecision(False, f"val and test scored once per case: mirroring TTA ({mirrors} predictions per "
                                  f"case) would take ~{mirrored:.0f} s, more than {MIRRORED_SCORING_SHARE:.0%} of "
                                  f"the {budget_minutes:g}-min budget; training still flips every axis, so "
                                  "predict --tta works (set validation.tta: true to score with it)", mirrored)
