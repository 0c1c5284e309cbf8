"""A plan: the config ``medseg plan`` chose, why each value, and what nnU-Net would have chosen.

:class:`Plan` is what every task's planner returns and what :func:`medseg.plan` hands back. Its
config is an ordinary nested mapping in the shape of a YAML config; :meth:`Plan.to_yaml` writes it
with a one-line comment after every planned value (``# median spacing``, ``# probe: 0.041 s/step``),
so the file is a config a person can read, edit and pass to ``medseg run``.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
import yaml

from medseg.config import RunConfig
from medseg.config.paths import config_folder, path_keys, relative_raw_paths
from medseg.io.atomic import atomic_write_text
from medseg.planning.final_model import choose_final_training
from medseg.planning.fingerprint import Fingerprint

#: Order of the sections in a written config (the order people read a config in).
SECTION_ORDER = ("task", "seed", "output_dir", "pretrain", "data", "preprocess", "recon", "augment", "patch", "model", "loss", "optim",
                 "train", "validation", "postprocess", "tracking")


@dataclass(frozen=True)
class PlanRequest:
    """What the user asked for: the task, the budget and the device to plan for."""

    task: str
    budget_minutes: float
    device: torch.device
    name: str                       # the dataset's short name: experiment, output_dir, file names
    manifest: Path
    root: Path
    labels: dict[int, str]
    channel_names: list[str]
    probe: bool = True              # False: plan from rules alone (tests; no timing)
    progress: bool = True
    home: Path | None = None        # where the plan's outputs go (data_manifests/, runs/)
    relative_inputs: tuple[Path, ...] = ()  # folders the user named by relative paths (the dataset, its root)


@dataclass
class ExplainRow:
    setting: str
    medseg: str
    nnunet: str
    why: str


@dataclass(frozen=True)
class Candidate:
    """An alternative the rules leave open, raced on a held-out fold by :func:`medseg.planning.race.race`.

    ``overrides`` (dotted keys) turn the plan's config into this candidate; ``why_updates`` are the
    reasons that change with them. The first candidate of a plan is the rules' own choice (no overrides).
    """

    name: str
    description: str
    overrides: dict[str, Any] = field(default_factory=dict)
    why_updates: dict[str, str] = field(default_factory=dict)


@dataclass
class Plan:
    """A planned config with its reasons (``why``: dotted key -> one line), the probe's
    measurements and the rows of ``medseg plan --explain``."""

    request: PlanRequest
    config: dict[str, Any]
    why: dict[str, str]
    fingerprint: Fingerprint
    probe: list[dict[str, Any]] = field(default_factory=list)
    explain_rows: list[ExplainRow] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    candidates: list[Candidate] = field(default_factory=list)  # what `medseg run --plan` races (empty: nothing)
    selection_metric: str = "val/dice_mean"  # the task's: what a race is decided on
    race: dict[str, Any] | None = None  # how the race went, once run
    steps_in_budget: int | None = None  # training steps the probe says the budget buys (None: no probe)
    step_goal: int | None = None  # the steps the planner wants a model to get (the task's goal)
    ensemble_folds: int | None = None  # the final model is this many fold members (None: one model)
    pretraining: dict[str, Any] | None = None  # the task: pretraining config run first (None: no pretraining)
    pretraining_why: dict[str, str] = field(default_factory=dict)  # its reasons, as ``why``

    @property
    def task(self) -> str:
        return self.request.task

    # ---------------------------------------------------------------------------------- output

    def train_on_every_case(self, folds: int, fold_cases: int, calibrates: bool) -> None:
        """nnU-Net's split policy on a ``--folds`` manifest: no test split is carved out of the training
        cases, and the final training is a fold ensemble or one model on every case
        (:func:`medseg.planning.final_model.choose_final_training`)."""
        data = self.config["data"]
        if folds < 2 or data.get("fold") is not None:
            return
        final = choose_final_training(folds, self.steps_in_budget, self.step_goal)
        total = sum(1 for c in self.fingerprint.cases if c.split != "test")
        if final.ensemble:
            self._train_fold_ensemble(folds, total, final.why)
        else:
            data["fold"], data["train_folds"] = 0, "all"
            self.why["data.fold"] = (f"the manifest has {folds} cross-validation folds (nnU-Net's split: every "
                                     "training case in a fold, tests only from a test folder); fold 0 "
                                     f"({fold_cases} cases) is validated on for the learning curves")
            self.why["data.train_folds"] = (f"every case trains the final model: {final.why} (nnU-Net trains on all; "
                                            "fold 0's scores therefore only monitor training, and the last weights "
                                            "are kept)")
            if calibrates:
                self.config.setdefault("validation", {})["calibrate"] = False
                self.why["validation.calibrate"] = ("no temperature: the validation fold is trained on, and a "
                                                    "temperature fitted on seen cases would not mean what it says")
        shown = f"{folds}-fold ensemble of all {total}" if final.ensemble else f"all {total} ({folds} folds, fold 0 monitored)"
        self.explain_rows.insert(0, ExplainRow("training cases", shown, f"{folds}-fold ensemble of all {total}",
                                               final.why))

    def _train_fold_ensemble(self, folds: int, total: int, why: str) -> None:
        """The final model is ``folds`` runs, each on the other folds and validated on its own."""
        data, train = self.config["data"], self.config["train"]
        data["fold"], data["train_folds"] = 0, "others"
        train["folds"] = folds
        self.ensemble_folds = folds
        self.set_budget(float(train["max_minutes"]))
        self.why["train.folds"] = why
        self.why["data.train_folds"] = (f"each member trains on the other {folds - 1} folds of the {total} cases and "
                                        "validates on its own (cross-validation, as nnU-Net)")

    def set_budget(self, minutes: float) -> None:
        """Give the final training ``minutes``: all of it to one model, or a share to each fold member."""
        members = self.ensemble_folds or 1
        self.config["train"]["max_minutes"] = round(minutes / members, 2)
        if members > 1:
            self.why["train.max_minutes"] = (f"{minutes:g} min shared by the {members} fold members, "
                                             f"{minutes / members:.1f} min each")

    def header(self) -> list[str]:
        r = self.request
        fp = self.fingerprint
        when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        lines = [f"Planned by `medseg plan` ({when}) for a {r.budget_minutes:g}-minute budget on {describe_device(r.device)}.",
                 f"Dataset: {r.manifest} (root {r.root}), {len(fp.cases)} cases, {fp.spatial_dims}D, "
                 f"channels {fp.channel_names}; fingerprint {fingerprint_note(fp)}.",
                 "Every planned value says why; edit any of them, then `medseg run` this file."]
        if self.probe:
            lines.append("Probe (one training step on a synthetic batch, fastest of 4 after a warm-up, this machine):")
            for result in self.probe:
                step = result["seconds_per_step"]
                lines.append(f"  {result['name']:<34} {result['precision']:<5} "
                             f"{'channels-last' if result['channels_last'] else 'contiguous':<13} "
                             + (f"{step:.3f} s/step" if step is not None else result["note"])
                             + (f" ({result['note']})" if step is not None and result.get("note") else "")
                             + (f", peak {result['peak_memory_mb']:.0f} MiB" if result.get("peak_memory_mb") else ""))
        if self.candidates and self.race is None:
            lines.append("Candidates `medseg run --plan` races on fold 0 before training the winner: "
                         + "; ".join(f"{c.name} ({c.description})" for c in self.candidates))
        lines += [f"Note: {note}" for note in self.notes]
        return lines

    def to_yaml(self, folder: Path | None = None) -> str:
        """The config as YAML, the reasons as end-of-line comments. For a file in ``folder``, the
        paths inside the plan's home or inside a folder the user named relatively are written
        relative to ``folder`` (a config's relative paths start at its folder), the rest absolute."""
        out = ["# " + line for line in self.header()]
        config = self.config
        if folder is not None and self.request.home is not None:
            anchors = (self.request.home, *self.request.relative_inputs)
            config = relative_raw_paths(config, path_keys(RunConfig), folder, anchors)
        if folder is not None and config.get("pretrain"):  # written beside the plan: named relative to it
            config = {**config, "pretrain": os.path.relpath(config["pretrain"], folder)}
        ordered = {k: config[k] for k in SECTION_ORDER if k in config}
        ordered.update({k: v for k, v in config.items() if k not in ordered})
        _emit(ordered, self.why, "", 0, out)
        return "\n".join(out) + "\n"

    def write(self, path: str | Path) -> Path:
        """Write the commented config atomically, what lies in the plan's home (or in a folder given
        by a relative path) named relative to the file, the rest absolute: it loads from any folder.
        A plan that pretrains also writes ``<name>.pretrain.yaml`` beside it, which ``pretrain`` names."""
        if self.pretraining is not None:
            pretrain = Path(path).with_name(Path(path).name.removesuffix(".yaml") + ".pretrain.yaml")
            atomic_write_text(pretrain, self.pretraining_yaml(config_folder(pretrain)))
            self.config["pretrain"] = str(pretrain.resolve())
        return atomic_write_text(Path(path), self.to_yaml(config_folder(path)))

    def pretraining_yaml(self, folder: Path | None = None) -> str:
        """The pretraining stage's config as YAML with its reasons (paths as :meth:`to_yaml` writes them)."""
        if self.pretraining is None:
            raise ValueError("this plan does not pretrain")
        config = self.pretraining
        if folder is not None and self.request.home is not None:
            config = relative_raw_paths(config, path_keys(RunConfig), folder,
                                        (self.request.home, *self.request.relative_inputs))
        out = [f"# Pretraining planned by `medseg plan` for {self.request.name}: `medseg run` on the plan runs it "
               "first, then fine-tunes from its weights (model.init_from)."]
        _emit(config, self.pretraining_why, "", 0, out)
        return "\n".join(out) + "\n"

    def explain(self) -> str:
        """``medseg plan --explain``: each choice beside nnU-Net's default, and why."""
        rows = [ExplainRow("setting", "medseg plan", "nnU-Net default", "why")] + self.explain_rows
        widths = [max(len(getattr(r, c)) for r in rows) for c in ("setting", "medseg", "nnunet")]
        lines = []
        for i, r in enumerate(rows):
            lines.append(f"{r.setting:<{widths[0]}}  {r.medseg:<{widths[1]}}  {r.nnunet:<{widths[2]}}  {r.why}")
            if i == 0:
                lines.append("  ".join("-" * w for w in widths) + "  ---")
        return "\n".join(lines)

    def summary(self) -> dict[str, Any]:
        """What ``benchmarks`` and the MLflow run keep of a plan (JSON-able)."""
        return {"task": self.task, "budget_minutes": self.request.budget_minutes,
                "device": describe_device(self.request.device), "config": self.config, "why": self.why,
                "probe": self.probe, "notes": self.notes,
                "explain": [vars(r) for r in self.explain_rows],
                "candidates": [{"name": c.name, "description": c.description, "overrides": c.overrides}
                               for c in self.candidates], "race": self.race,
                "pretraining": self.pretraining, "fingerprint_seconds": self.fingerprint.elapsed_s}


def fingerprint_note(fp: Fingerprint) -> str:
    return (f"{fp.manifest_sha256[:12]}" if fp.manifest_sha256 else "not cached") + f", measured in {fp.elapsed_s:.1f} s"


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA)"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return f"{platform.processor() or platform.machine()} CPU, {cores} core(s), torch {torch.__version__}"


def _scalar(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000, sort_keys=False).strip()
    return text.removesuffix("\n...").removesuffix("...").strip()


def _comment(why: Mapping[str, str], path: str) -> str:
    return f"  # {why[path]}" if path in why else ""


def _emit(node: Mapping[str, Any], why: Mapping[str, str], prefix: str, indent: int, out: list[str]) -> None:
    pad = "  " * indent
    for key, value in node.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping) and value and not _flow(path):
            out.append(f"{pad}{key}:{_comment(why, path)}")
            _emit(value, why, path + ".", indent + 1, out)
        elif isinstance(value, Sequence) and not isinstance(value, str) and value \
                and all(isinstance(v, Mapping) for v in value):
            out.append(f"{pad}{key}:{_comment(why, path)}")
            for i, item in enumerate(value):
                out.append(f"{pad}  - {_scalar(dict(item))}{_comment(why, f'{path}.{i}')}")
        else:
            out.append(f"{pad}{key}: {_scalar(value)}{_comment(why, path)}")


def _flow(path: str) -> bool:
    """Small mappings written on one line, as the hand-written configs do."""
    return path in {"preprocess.intensity", "loss", "data.labels"}
