"""The config of image-to-image translation (``recon.problem: translation``): which of the
manifest's channels is the contrast to synthesise and which the network sees. Pydantic only, so
``medseg validate`` and the registry import it without torch.
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import Field

from medseg.config import Section


class TranslationConfig(Section):
    """One contrast synthesised from others of the same case, all on one grid (``data.channels``
    names every channel of the manifest's ``image`` column, in order)."""

    target: str = Field(description="The data.channels name of the contrast to synthesise (the network's target).")
    inputs: list[str] | None = Field(
        default=None, description="The data.channels names the network sees, in order; null: every channel but "
        "the target.")
    baseline_channel: str | None = Field(
        default=None, description="The input whose histogram is matched to the training targets' (the baseline); "
        "null: the first input.")
    tta: bool = Field(default=True, description="Average over in-plane flips; their spread per voxel is the "
                      "uncertainty map.")
    trusted_error: float | None = Field(
        default=None, gt=0.0, le=1.0, description="An error budget for the trusted mask: its threshold is the "
        "largest uncertainty whose validation voxels (those at or below it) keep this mean absolute error "
        "(targets scaled to [0, 1]). null: the threshold is the trusted_coverage quantile of the validation "
        "uncertainties instead.")
    trusted_coverage: float = Field(
        default=0.9, gt=0.0, le=1.0, description="Without trusted_error: the share of validation voxels the "
        "trusted mask keeps (its threshold is that quantile of their uncertainty).")

    def input_channels(self, channels: Sequence[str]) -> list[str]:
        """The network's input channel names, in order."""
        return list(self.inputs) if self.inputs is not None else [c for c in channels if c != self.target]

    def baseline_input(self, channels: Sequence[str]) -> str:
        """The input channel the histogram-matching baseline maps."""
        return self.baseline_channel or self.input_channels(channels)[0]


def check_translation_channels(translation: TranslationConfig | None, channels: Sequence[str]) -> None:
    """Every channel the translation names is one of ``data.channels``, and the target is not an input.

    Raises:
        ValueError: (pydantic reports it with the config file) in Expected / Got form, with the fix.
    """
    if translation is None:
        raise ValueError("recon.problem: translation needs recon.translation. Expected: recon.translation: "
                         "{target: <one of data.channels>}. Got: nothing. Fix: name the contrast to synthesise")
    known = list(channels)
    if translation.target not in known:
        raise ValueError(f"recon.translation.target {translation.target!r} is not a channel of the manifest. "
                         f"Expected: one of data.channels {known}. Got: {translation.target!r}. Fix: add the "
                         "target contrast to data.channels (and its file to the manifest's image column) or "
                         "name one that is there")
    inputs = translation.input_channels(known)
    unknown = [c for c in [*inputs, translation.baseline_input(known)] if c not in known]
    if unknown:
        raise ValueError(f"recon.translation names channel(s) {unknown} that data.channels {known} lacks. "
                         f"Expected: names from data.channels. Got: {unknown}. Fix: correct the names")
    if not inputs or translation.target in inputs:
        raise ValueError(f"recon.translation.inputs {inputs}: Expected: at least one channel, not the target "
                         f"{translation.target!r}. Got: {inputs}. Fix: list the contrasts the network sees")
    if translation.baseline_input(known) not in inputs:
        raise ValueError(f"recon.translation.baseline_channel {translation.baseline_channel!r}: Expected: one of "
                         f"the inputs {inputs}. Got: {translation.baseline_channel!r}")


__all__ = ["TranslationConfig", "check_translation_channels"]
