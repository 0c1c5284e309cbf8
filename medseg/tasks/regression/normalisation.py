"""Target normalisation: what the network is trained on, and the way back to the targets' units.

The training split's statistics are fitted once and travel in the model's contract (``targets``),
so a prediction is always returned in the units the targets were given in, and an ensemble's
members may each carry their own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from medseg.errors import ModelError


@dataclass(frozen=True)
class TargetNormaliser:
    """Per target: ``normalised = (value - mean) / std``; with ``mode: none`` mean 0 and std 1.

    Attributes:
        columns: the targets, one network output each, in order.
        mode: ``zscore`` or ``none``.
        mean, std: per target, from the training split.
        low, high: per target, the training split's range (ordinal targets are rounded into it).
        ordinal: the targets are integer grades.
        units: the targets' units, for reports (None: unknown).
    """

    columns: tuple[str, ...]
    mode: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    low: tuple[float, ...]
    high: tuple[float, ...]
    ordinal: bool = False
    units: str | None = None

    @classmethod
    def fit(cls, targets: np.ndarray, columns: Sequence[str], mode: str, ordinal: bool = False,
            units: str | None = None) -> TargetNormaliser:
        """Fit on the training targets, ``(cases, len(columns))``.

        Raises:
            ModelError: no training target to fit on.
        """
        values = np.asarray(targets, dtype=np.float64).reshape(-1, len(columns))
        if not len(values):
            raise ModelError(f"target normalisation: no training case has targets {list(columns)}; "
                             "check data.train_split and the targets file")
        mean = values.mean(0) if mode == "zscore" else np.zeros(len(columns))
        std = values.std(0) if mode == "zscore" else np.ones(len(columns))
        std = np.where(std > 0, std, 1.0)  # a constant target: only shifted, never divided by zero
        return cls(tuple(columns), str(mode), _floats(mean), _floats(std), _floats(values.min(0)),
                   _floats(values.max(0)), ordinal, units)

    def normalise(self, values: np.ndarray) -> np.ndarray:
        """``(..., len(columns))`` targets -> what the network learns (float32)."""
        return ((np.asarray(values, dtype=np.float64) - self.mean) / self.std).astype(np.float32)

    def denormalise(self, outputs: np.ndarray) -> np.ndarray:
        """``(..., len(columns))`` network outputs -> the targets' units (float64)."""
        return np.asarray(outputs, dtype=np.float64) * self.std + self.mean

    def to_contract(self) -> dict[str, Any]:
        """The ``targets`` entry of a model's contract (JSON)."""
        return {"columns": list(self.columns), "normalisation": self.mode, "mean": list(self.mean),
                "std": list(self.std), "low": list(self.low), "high": list(self.high), "ordinal": self.ordinal,
                "units": self.units}

    @classmethod
    def from_contract(cls, entry: Any, source: str = "the model's contract") -> TargetNormaliser:
        """Read a contract's ``targets`` entry back.

        Raises:
            ModelError: it is missing or malformed (the model was not made by a regression run).
        """
        try:
            columns = tuple(str(c) for c in entry["columns"])
            fields = {key: tuple(float(v) for v in entry[key]) for key in ("mean", "std", "low", "high")}
            mode = str(entry["normalisation"])
        except (KeyError, TypeError, ValueError) as err:
            raise ModelError(f"{source}: its 'targets' entry is missing or malformed ({err!r}); expected columns, "
                             "normalisation, mean, std, low and high, as a regression run packages them") from None
        if any(len(v) != len(columns) for v in fields.values()) or not all(s > 0 for s in fields["std"]):
            raise ModelError(f"{source}: 'targets' has {len(columns)} columns but statistics of other lengths, "
                             "or a standard deviation that is not positive")
        return cls(columns, mode, fields["mean"], fields["std"], fields["low"], fields["high"],
                   bool(entry.get("ordinal", False)), entry.get("units"))


def _floats(values: np.ndarray) -> tuple[float, ...]:
    return tuple(float(v) for v in values)
