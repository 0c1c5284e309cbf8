"""Target normalisation: fitted on the training targets, undone to float32 precision, and carried through the
model's contract (JSON) without loss."""

from __future__ import annotations

import json

import numpy as np
import pytest

from medseg.errors import ModelError
from medseg.tasks.regression.normalisation import TargetNormaliser


def _targets(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # two targets of very different scales: a volume in mL and a grade
    return np.stack([rng.normal(3500.0, 400.0, 37), rng.integers(0, 5, 37).astype(float)], axis=1)


def test_zscore_round_trip_holds_to_float32_precision_and_standardises_the_training_targets() -> None:
    targets = _targets()
    norm = TargetNormaliser.fit(targets, ["volume_ml", "grade"], "zscore")
    scaled = norm.normalise(targets)
    assert scaled.dtype == np.float32 and scaled.shape == targets.shape
    np.testing.assert_allclose(scaled.mean(0), [0.0, 0.0], atol=1e-5)
    np.testing.assert_allclose(scaled.std(0), [1.0, 1.0], atol=1e-5)
    np.testing.assert_allclose(norm.denormalise(scaled), targets, rtol=1e-6, atol=1e-5)  # float32 in between
    np.testing.assert_allclose(norm.denormalise(norm.normalise(targets[0])), targets[0], rtol=1e-6, atol=1e-5)
    assert norm.low == tuple(targets.min(0)) and norm.high == tuple(targets.max(0))


def test_the_contract_entry_survives_json_and_gives_the_same_predictions() -> None:
    targets = _targets(1)
    norm = TargetNormaliser.fit(targets, ["volume_ml", "grade"], "zscore", ordinal=True, units="mL")
    back = TargetNormaliser.from_contract(json.loads(json.dumps(norm.to_contract())))
    assert back == norm
    outputs = np.array([[0.3, -1.2], [2.0, 0.0]], dtype=np.float32)
    np.testing.assert_array_equal(back.denormalise(outputs), norm.denormalise(outputs))


def test_none_leaves_targets_as_they_are_and_a_constant_target_is_only_shifted() -> None:
    targets = np.array([[2.5], [2.5], [2.5]])
    none = TargetNormaliser.fit(targets, ["t"], "none")
    np.testing.assert_array_equal(none.normalise(targets), targets.astype(np.float32))
    constant = TargetNormaliser.fit(targets, ["t"], "zscore")
    assert constant.std == (1.0,) and np.all(np.isfinite(constant.normalise(targets)))
    np.testing.assert_allclose(constant.denormalise(constant.normalise(targets)), targets)


def test_no_training_target_and_a_broken_contract_entry_are_refused() -> None:
    with pytest.raises(ModelError, match=r"no training case has targets \['t'\]"):
        TargetNormaliser.fit(np.zeros((0, 1)), ["t"], "zscore")
    with pytest.raises(ModelError, match="model m: its 'targets' entry is missing or malformed"):
        TargetNormaliser.from_contract(None, "model m")
    entry = TargetNormaliser.fit(_targets(), ["a", "b"], "zscore").to_contract()
    with pytest.raises(ModelError, match="2 columns but statistics of other lengths"):
        TargetNormaliser.from_contract({**entry, "std": [1.0]})
    with pytest.raises(ModelError, match="standard deviation that is not positive"):
        TargetNormaliser.from_contract({**entry, "std": [1.0, 0.0]})
