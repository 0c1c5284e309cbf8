"""``medseg model check``: is a model folder what medseg wrote, before anyone loads it?

A medseg model holds data only: ``medseg_model.json`` and ``weights.safetensors`` (and, in a
``medseg export`` folder, a ``network.onnx`` whose sha256 the JSON pins). Logged to MLflow, the
folder sits under ``data/medseg_model/`` beside an ``MLmodel`` whose pyfunc loader is the
installed :mod:`medseg.serving.pyfunc_loader` and a bundled medseg wheel, with the sha256 of each
of these files recorded in ``MLmodel``'s metadata when the model was logged.

Whoever can write to an artifact store can change any of that: point the loader at their own
module, add a ``code/`` folder or a pickled ``python_model`` (which ``mlflow.pyfunc.load_model``
and ``mlflow models serve`` would run), or swap the weights or the graph. :func:`check_model_folder`
names each such change as a :class:`Finding` (file, expected, found, fix) without importing,
unpickling or running anything; :func:`require_untampered` is what every medseg loader calls first.
"""

from __future__ import annotations

import json
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medseg.errors import ModelLoadError
from medseg.tracking.model_layout import (
    FILES_METADATA_KEY,
    LEGACY_ARTIFACTS_FOLDER,
    LOADER_MODULE,
    MLFLOW_DATA_FOLDER,
    MODEL_FILE,
    WEIGHTS_FILE,
    WHEELS_FOLDER,
    file_sha256,
    model_folder_of,
)

#: What MLflow itself writes beside ``MLmodel`` (environment descriptions, examples).
MLFLOW_FILES = frozenset({"MLmodel", "conda.yaml", "python_env.yaml", "requirements.txt", "registered_model_meta",
                          "input_example.json", "serving_input_example.json"})
#: The ``python_model.py`` of models logged "from code" by earlier medseg versions (it only imported
#: the installed medseg); such a model is read by medseg, which never runs that file.
LEGACY_CODE_SHA256 = frozenset({"1d649dce17b34a5f53f2effad3154a44a503c770525a1c9e072c79afeeec5ef9"})
#: Files that hold code or pickles (unpickling runs code): never part of a medseg model unless pinned.
CODE_SUFFIXES = (".py", ".pyc", ".pyo", ".so", ".dll", ".dylib", ".pkl", ".pickle", ".pth", ".pt", ".bin", ".sh",
                 ".whl", ".egg", ".zip", ".jar", ".joblib")
FIX_RELOG = "download or log the model again from its run (medseg run, or medseg export), and check where it came from"


@dataclass(frozen=True)
class Finding:
    """One way a model folder differs from what medseg wrote.

    Attributes:
        file: the file or folder, relative to the model folder.
        expected: what medseg wrote there.
        found: what is there.
        fix: what to do.
    """

    file: str
    expected: str
    found: str
    fix: str = FIX_RELOG

    def __str__(self) -> str:
        return f"{self.file}: expected {self.expected}; found {self.found}; fix: {self.fix}"


@dataclass(frozen=True)
class ModelCheck:
    """What :func:`check_model_folder` found.

    Attributes:
        root: the folder checked.
        layout: ``mlflow`` (an MLflow model), ``folder`` (a run's or export's model folder) or
            ``legacy`` (an MLflow model logged from code by an earlier medseg).
        findings: each tampering found; none means the folder is as medseg wrote it.
        verified: the files whose sha256 matched the recorded one (path -> sha256).
    """

    root: Path
    layout: str
    findings: tuple[Finding, ...]
    verified: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.findings

    def message(self, ref: str) -> str:
        lines = "\n".join(f"  - {finding}" for finding in self.findings)
        return (f"--model {ref}: refused, {len(self.findings)} file(s) differ from what medseg wrote; "
                f"nothing in the folder was loaded or run:\n{lines}")


def check_model_folder(root: Path) -> ModelCheck:
    """Check the model folder ``root`` (a local folder; download a URI first) without loading it.

    Returns:
        The :class:`ModelCheck`; ``findings`` is empty for an untouched medseg model.
    """
    root = Path(root)
    folder = model_folder_of(root)
    if folder is None:
        return ModelCheck(root, "folder", (Finding(".", f"a medseg model ({MODEL_FILE} and {WEIGHTS_FILE})",
                                                   "no medseg model", "give a model folder or a runs:/ or "
                                                   "models:/ URI of a model logged by medseg"),))
    findings: list[Finding] = []
    verified: dict[str, str] = {}
    layout = "folder"
    expected_files: dict[str, str] = {}
    if (root / "MLmodel").is_file():
        layout, expected_files = _check_mlmodel(root, findings)
        findings += _check_requirements(root, expected_files)
    findings += _check_medseg_folder(root, folder, expected_files)
    for rel, digest in expected_files.items():
        path = root / rel
        if not path.is_file() or path.is_symlink():
            findings.append(Finding(rel, f"a file of sha256 {digest}", "no such file"))
            continue
        found = file_sha256(path)
        if found != digest:  # a corrupt or truncated download, or a replaced file
            findings.append(Finding(rel, f"sha256 {digest}", f"sha256 {found} (a corrupt download, or replaced)"))
        else:
            verified[rel] = found
    findings += _check_tree(root, folder, set(expected_files), layout)
    return ModelCheck(root, layout, tuple(_unique(findings)), verified)


def require_untampered(root: Path, ref: str) -> ModelCheck:
    """:func:`check_model_folder`, raising when anything was found.

    Raises:
        ModelLoadError: the folder was tampered with; the message names each finding and its fix.
    """
    result = check_model_folder(root)
    if model_folder_of(Path(root)) is not None and not result.ok:
        raise ModelLoadError(result.message(ref))
    return result


def _dict(value: Any) -> dict[str, Any]:
    """``value`` if it is a mapping (parsed YAML or JSON), else empty."""
    return value if isinstance(value, dict) else {}


def _unique(findings: list[Finding]) -> list[Finding]:
    return list(dict.fromkeys(findings))


def _read_yaml(path: Path) -> Any:
    import yaml

    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None


def _check_mlmodel(root: Path, findings: list[Finding]) -> tuple[str, dict[str, str]]:
    """The layout and the recorded file hashes; appends what is wrong with ``MLmodel`` to ``findings``."""
    mlmodel = _read_yaml(root / "MLmodel")
    if not isinstance(mlmodel, dict):
        findings.append(Finding("MLmodel", "MLflow's model description (YAML)", "an unreadable file"))
        return "mlflow", {}
    flavors = _dict(mlmodel.get("flavors"))
    if set(flavors) != {"python_function"}:
        findings.append(Finding("MLmodel", "one flavor, python_function", f"flavors {sorted(flavors)}"))
    pyfunc = _dict(flavors.get("python_function"))
    loader, code = pyfunc.get("loader_module"), pyfunc.get("code")
    metadata = _dict(mlmodel.get("metadata"))
    recorded = metadata.get(FILES_METADATA_KEY)
    if loader == "mlflow.pyfunc.model" and pyfunc.get("python_model") == "python_model.py" and not code \
            and (root / "python_model.py").is_file() and file_sha256(root / "python_model.py") in LEGACY_CODE_SHA256:
        return "legacy", {}  # medseg's own earlier code file, unchanged: medseg never runs it
    if loader != LOADER_MODULE:
        findings.append(Finding("MLmodel", f"python_function loader_module {LOADER_MODULE}",
                                f"loader_module {loader!r}" + (f" with python_model {pyfunc.get('python_model')!r}"
                                                               if pyfunc.get("python_model") else "")))
    if code:
        findings.append(Finding("MLmodel", "no code entry (the loader is in the installed medseg)",
                                f"code: {code!r}, which MLflow puts first on sys.path"))
    if pyfunc.get("data") != MLFLOW_DATA_FOLDER:
        findings.append(Finding("MLmodel", f"python_function data {MLFLOW_DATA_FOLDER}", f"data {pyfunc.get('data')!r}"))
    if not isinstance(recorded, dict) or not recorded:
        findings.append(Finding("MLmodel", f"metadata.{FILES_METADATA_KEY} (the sha256 of each logged file)",
                                "none recorded"))
        return "mlflow", {}
    return "mlflow", {str(k): str(v) for k, v in recorded.items()}


def _check_requirements(root: Path, expected_files: dict[str, str]) -> list[Finding]:
    """No requirement installs medseg from an index, a URL or a file other than the bundled wheel."""
    wheels = {rel for rel in expected_files if rel.startswith(f"{WHEELS_FOLDER}/")}
    findings = []
    lines: list[tuple[str, str]] = []
    if (root / "requirements.txt").is_file():
        lines += [("requirements.txt", line) for line in (root / "requirements.txt").read_text(errors="replace").splitlines()]
    conda = _read_yaml(root / "conda.yaml") if (root / "conda.yaml").is_file() else None
    for dep in (conda or {}).get("dependencies", []) if isinstance(conda, dict) else []:
        if isinstance(dep, dict):
            lines += [("conda.yaml", str(item)) for item in dep.get("pip", []) or []]
    env = _read_yaml(root / "python_env.yaml") if (root / "python_env.yaml").is_file() else None
    if isinstance(env, dict):
        lines += [("python_env.yaml", str(item)) for key in ("build_dependencies", "dependencies")
                  for item in env.get(key) or [] if str(item).strip() != "-r requirements.txt"]
    for name, line in lines:
        problem = _requirement_problem(line.split("#", 1)[0].strip(), wheels)
        if problem:
            findings.append(Finding(name, "named packages, and medseg only as the bundled wheel "
                                          f"{', '.join(sorted(wheels)) or WHEELS_FOLDER + '/medseg-*.whl'}",
                                    problem, FIX_RELOG))
    return findings


def _requirement_problem(line: str, wheels: set[str]) -> str | None:
    if not line or line in wheels:
        return None
    if line.startswith("-") or "/" in line or "\\" in line or ":" in line:
        return f"the requirement {line!r} (an option, a URL or a file: what it installs runs as code)"
    from packaging.requirements import InvalidRequirement, Requirement

    try:
        requirement = Requirement(line)
    except InvalidRequirement:
        return f"the requirement {line!r}, which is not a package requirement"
    if requirement.url:
        return f"the requirement {line!r} (a URL)"
    if requirement.name.lower().replace("_", "-") == "medseg":
        return f"the requirement {line!r}, which the package index would answer with whatever is published as medseg"
    return None


def _check_medseg_folder(root: Path, folder: Path, expected_files: dict[str, str]) -> list[Finding]:
    """The weights' and pinned files' hashes that ``medseg_model.json`` records (added to ``expected_files``)."""
    rel = folder.relative_to(root).as_posix()
    prefix = "" if rel == "." else f"{rel}/"
    try:
        info = json.loads((folder / MODEL_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return [Finding(prefix + MODEL_FILE, "the model's JSON description", "an unreadable file")]
    if not isinstance(info, dict):
        return [Finding(prefix + MODEL_FILE, "the model's JSON description", "no JSON object")]
    findings = []
    weights = _dict(info.get("weights"))
    name, digest = str(weights.get("file", WEIGHTS_FILE)), weights.get("sha256")
    if "/" in name or name.startswith("."):
        findings.append(Finding(prefix + MODEL_FILE, f"weights.file {WEIGHTS_FILE}", f"weights.file {name!r}"))
    elif not digest:
        findings.append(Finding(prefix + MODEL_FILE, f"the sha256 of {name}", "none recorded"))
    else:
        _expect(expected_files, prefix + name, str(digest), findings, prefix + MODEL_FILE)
    pinned = _dict(info.get("files"))
    for file, sha in pinned.items():
        if "/" in str(file) or str(file).startswith("."):
            findings.append(Finding(prefix + MODEL_FILE, "files named inside the folder", f"files entry {file!r}"))
            continue
        _expect(expected_files, prefix + str(file), str(sha), findings, prefix + MODEL_FILE)
    return findings


def _expect(expected: dict[str, str], rel: str, digest: str, findings: list[Finding], where: str) -> None:
    """Add ``rel`` -> ``digest``; two records of one file that disagree are a finding."""
    if rel in expected and expected[rel] != digest:
        findings.append(Finding(where, f"the sha256 {expected[rel]} MLmodel records for {rel}", f"sha256 {digest}"))
    expected.setdefault(rel, digest)


def _check_tree(root: Path, folder: Path, expected: set[str], layout: str) -> list[Finding]:
    """Links, a ``code/`` folder, pickles, code and executables: anything that could run, unless pinned."""
    findings = []
    folder_rel = folder.relative_to(root).as_posix()
    legacy = {"python_model.py", "MLmodel"} if layout == "legacy" else set()
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_symlink():
            findings.append(Finding(rel, "a regular file", f"a symbolic link to {path.readlink()}",
                                    "remove the link; a model folder holds its own files"))
            continue
        if path.is_dir():
            if rel == "code" or rel.endswith("/__pycache__") or rel == "__pycache__":
                findings.append(Finding(rel, "no code folder (the loader is in the installed medseg)",
                                        "a folder of code that MLflow would put first on sys.path",
                                        f"delete {rel}, or {FIX_RELOG}"))
            continue
        if rel in expected or rel in legacy:
            continue
        mode = path.stat().st_mode
        name = path.name.lower()
        if name == "python_model.pkl" or name.endswith((".pkl", ".pickle")) or _is_pickle(path):
            findings.append(Finding(rel, "no pickle (unpickling runs code)", "a pickled object",
                                    f"delete {rel}, or {FIX_RELOG}"))
        elif name.endswith(".onnx"):
            findings.append(Finding(rel, f"a graph whose sha256 {MODEL_FILE} pins", "an unpinned graph",
                                    "export it again with `medseg export` (which pins it), or delete it"))
        elif mode & (stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH) or name.endswith(CODE_SUFFIXES):
            findings.append(Finding(rel, "data files only", "a file of code" + (" marked executable"
                                                                              if mode & 0o111 else ""),
                                    f"delete {rel}, or {FIX_RELOG}"))
        elif layout != "folder" and not rel.startswith(f"{folder_rel}/") and rel not in MLFLOW_FILES \
                and not rel.startswith(f"{LEGACY_ARTIFACTS_FOLDER}/"):
            findings.append(Finding(rel, "only MLflow's own files beside the model folder", "a file medseg did not log",
                                    f"delete {rel}, or {FIX_RELOG}"))
    return findings


def _is_pickle(path: Path) -> bool:
    """A pickle of protocol 2 or later starts with PROTO (0x80) and the protocol number."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(2)
    except OSError:
        return False
    return len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5
