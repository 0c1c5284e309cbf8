"""Structure-aware planning: what the label maps' shapes decide (nested classes, rare and small ones).

nnU-Net learns labels with a softmax unless a person declares regions in dataset.json, and samples
a third of its patches on foreground whatever the classes look like. Its users keep declaring
regions by hand and getting them wrong (nnU-Net #1514, #1952, #2900, #3042). medseg reads the
same facts off the fingerprint instead:

- **nested classes** (a class whose outer shell is another class: necrosis inside an enhancing
  rim inside edema) become region targets, one sigmoid per region, Dice + BCE, decoded back to
  labels outermost first (:func:`medseg.planning.rules.containment_tree`, ``regions_from_tree``);
  label-wise softmax stays a candidate the race may still prefer;
- **rarity against the image**, not only against the other classes: a class under 1 % of the
  image or in small components is sought out by the patch sampler;
- **small fragmented classes** get a search for the smallest predicted component worth keeping,
  decided on the held-out fold (``postprocess.search_min_component_size``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from medseg.planning import rules
from medseg.planning.fingerprint import Fingerprint
from medseg.planning.plan import Candidate, ExplainRow

#: A class with at least this many components per case (median) is fragmented: small predicted
#: specks are then a real question for post-processing.
FRAGMENTED_COMPONENTS = 3


@dataclass
class StructureDecisions:
    """What the structures decided: config sections, reasons, ``--explain`` rows and race candidates."""

    regions: list[dict[str, Any]] | None = None
    rare: dict[int, str] = field(default_factory=dict)
    min_component_search: list[int] = field(default_factory=list)
    why: dict[str, str] = field(default_factory=dict)
    explain: list[ExplainRow] = field(default_factory=list)
    candidates: list[Candidate] = field(default_factory=list)


def decide(fp: Fingerprint, labels: dict[int, str]) -> StructureDecisions:
    """Regions, image-relative rarity and the post-processing search for a segmentation plan."""
    out = StructureDecisions()
    _regions(fp, labels, out)
    medians = {c.value: c.component_voxels_median for c in fp.classes
               if c.value != 0 and c.component_voxels_median is not None}
    out.rare = rules.rare_against_image(fp.image_fractions(), medians)
    _post_processing(fp, labels, out)
    return out


def _regions(fp: Fingerprint, labels: dict[int, str], out: StructureDecisions) -> None:
    shells = fp.shell_fractions()
    tree = rules.containment_tree(shells) if shells else {}
    regions = rules.regions_from_tree(tree, labels) if tree else None
    nnunet = "labels, softmax (regions only when declared by hand in dataset.json)"
    if not regions:
        out.explain.append(ExplainRow("targets", "labels, softmax", nnunet,
                                      "no class lies inside another (fingerprint: class shells)"))
        return
    nesting = "; ".join(f"{labels.get(child, child)} inside {labels.get(parent, parent)}"
                        for child, parent in sorted(tree.items()) if parent is not None)
    out.regions = [{"name": name, "labels": members} for name, members in regions]
    reason = (f"nested classes ({nesting}; fingerprint: each one's outer shell is >= 90 % its encloser): "
              "nnU-Net's region-based training, one sigmoid per region (a class and all it encloses), "
              "decoded outermost first")
    out.why["regions"] = reason
    out.why["loss"] = "Dice + binary cross-entropy on the region masks (nnU-Net's loss for regions)"
    out.explain.append(ExplainRow("targets", f"{len(regions)} regions, sigmoid", nnunet, reason))
    out.candidates = [
        Candidate("regions", "region targets, sigmoid, Dice + BCE (the rules' choice)"),
        Candidate("labels", "label-wise softmax, Dice + CE", {"regions": None},
                  {"regions": "label-wise softmax: it beat region targets on the held-out fold",
                   "loss": "Dice + cross-entropy (nnU-Net)"}),
    ]


def _post_processing(fp: Fingerprint, labels: dict[int, str], out: StructureDecisions) -> None:
    fragmented = {c.value: c for c in fp.classes if c.value != 0 and c.components_per_case is not None
                  and c.components_per_case >= FRAGMENTED_COMPONENTS}
    thresholds: set[int] = set()
    for value in fragmented:
        thresholds.update(rules.min_component_size_candidates(fp.component_voxels(value)))
    if len(thresholds) < 2:  # only 0: nothing to try
        return
    out.min_component_search = sorted(thresholds)
    names = ", ".join(f"{labels.get(v, v)} (~{c.components_per_case:g} components a case)"
                      for v, c in sorted(fragmented.items()))
    out.why["postprocess.search_min_component_size"] = (
        f"fragmented class(es) {names}: predicted components below each threshold (a quarter / half of the "
        "5th-percentile true component) are tried on the held-out fold; one is kept only if it adds Dice")
    out.explain.append(ExplainRow("post-processing", f"min component size from {out.min_component_search}",
                                  "largest component, decided on CV",
                                  out.why["postprocess.search_min_component_size"]))
