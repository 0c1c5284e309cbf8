"""Exported networks and the inference backends that run them (``medseg predict --backend``,
``medseg export --format``).

A trained network leaves medseg in one of two forms:

* **ONNX** (:func:`export_onnx`): a graph of standard operators with the batch axis (and, for
  networks that allow it, the spatial axes) left free. medseg runs it with ONNX Runtime or
  OpenVINO (:class:`OnnxRuntimeNetwork`, :class:`OpenVinoNetwork`), which wrap the graph as an
  ``nn.Module`` so sliding windows, TTA and ensembles use it exactly like the torch network.
* **TorchScript** (:func:`export_torchscript`): for other tools only. medseg itself never loads
  TorchScript: a TorchScript file is code, and nothing medseg reads from disk may run code.

:func:`backend_network` is what the predictor calls: the torch network for ``torch``, else the
network exported once into a private work folder (reused while the weights are the same) and
wrapped. Every graph that runs is pinned: its sha256 is recorded when it is exported (in the work
folder's ``export.json``, or in a ``medseg export`` folder's ``medseg_model.json``) and checked
right before the runtime loads it; a graph whose bytes differ is exported again from the verified
weights, never run. The wrapper's ``sha256`` is what ran.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import itertools
import json
import logging
import operator
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
from torch import nn

from medseg.config import StrEnum
from medseg.errors import ModelError, ModelLoadError, UsageError
from medseg.io.atomic import atomic_path, atomic_write_text
from medseg.tracking.model_layout import file_sha256
from medseg.tracking.wheel import private_folder

log = logging.getLogger(__name__)


class Backend(StrEnum):
    TORCH = "torch"
    ONNXRUNTIME = "onnxruntime"
    OPENVINO = "openvino"


class ExportFormat(StrEnum):
    ONNX = "onnx"
    TORCHSCRIPT = "torchscript"


#: ``medseg predict --backend`` values, torch first (the default).
BACKENDS = tuple(b.value for b in Backend)
#: ``medseg export --format`` values.
EXPORT_FORMATS = tuple(f.value for f in ExportFormat)

#: Opset of exported graphs: the one onnxscript's torch library is written in (no version
#: conversion), run by ONNX Runtime >= 1.14 and every OpenVINO release medseg supports.
ONNX_OPSET = 18
#: Names of the exported graph's one input and one output.
INPUT_NAME = "image"
OUTPUT_NAME = "output"
#: ``metadata_props`` key of the exported file: which weights it was made from (see :func:`network_digest`).
DIGEST_KEY = "medseg.network_digest"
#: The file :func:`backend_network` exports to in its work folder.
EXPORTED_NAME = "network.onnx"
#: Beside it: the sha256 of the graph exported there and the :func:`network_digest` it was made for.
EXPORT_RECORD = "export.json"

#: The package each backend imports, and the pip extra that installs it.
_BACKEND_PACKAGES = {Backend.ONNXRUNTIME: ("onnxruntime", "onnx"), Backend.OPENVINO: ("openvino", "openvino")}
#: ONNX export needs the ONNX model package and the exporter's operator library.
_EXPORT_PACKAGES = (("onnx", "onnx"), ("onnxscript", "onnx"))


def _import_package(package: str, extra: str, purpose: str) -> ModuleType:
    """Import ``package``, or say which medseg extra installs it.

    Raises:
        UsageError: the package is not installed (or broken); the message names it and the pip command.
    """
    try:
        return importlib.import_module(package)
    except ImportError as err:
        raise UsageError(f"{purpose} needs the Python package {package!r}, which cannot be imported here "
                         f"({err}); install it with: pip install 'medseg[{extra}]'") from err


def available_backends() -> list[str]:
    """The backends that can run here: ``torch`` always, then each one whose package imports."""
    found = [Backend.TORCH.value]
    for backend, (package, _) in _BACKEND_PACKAGES.items():
        try:
            importlib.import_module(package)
        except ImportError:
            continue
        found.append(backend.value)
    return found


# ----------------------------------------------------------------------------------- export


def _device_of(network: nn.Module) -> torch.device:
    first = next(itertools.chain(network.parameters(), network.buffers()), None)
    return first.device if first is not None else torch.device("cpu")


def _export_input(network: nn.Module, example: torch.Tensor, function: str) -> torch.Tensor:
    """The example as a plain float32 tensor on the network's device; refuses a training-mode network.

    Raises:
        ValueError: the network is in training mode, or the example is not a batch (N, C, *spatial).
    """
    if network.training:
        raise ValueError(f"{function}: {type(network).__name__} is in training mode (dropout active, batch norms "
                         "learning); export what prediction runs: network.eval(), then fold_batch_norms")
    if example.ndim < 3:
        raise ValueError(f"{function}: example of shape {tuple(example.shape)} is not a batch (N, C, *spatial); "
                         "give one input batch of the network, e.g. torch.zeros(2, channels, *patch_size)")
    # a MetaTensor's metadata means nothing to a traced graph and breaks torch.export
    return example.detach().as_subclass(torch.Tensor).to(_device_of(network), torch.float32).contiguous()


def network_digest(network: nn.Module, example: torch.Tensor, dynamic_spatial: bool) -> str:
    """A SHA-256 of what an exported file depends on: the network's class and weights, the input's
    channels (and spatial size when fixed), the opset and the torch version that exported it."""
    sha = hashlib.sha256()
    spatial = "dynamic" if dynamic_spatial else tuple(example.shape[2:])
    # the repr holds what weights do not (strides, paddings, activations); the weights the rest
    sha.update(repr((repr(network), int(example.shape[1]), example.ndim, spatial, ONNX_OPSET,
                     torch.__version__)).encode())
    for name, tensor in network.state_dict().items():
        sha.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        # bytes, not values: works for every dtype, numpy's included or not
        sha.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return sha.hexdigest()


def _size_bitwise_or(self: Any, other: Any) -> Any:
    """ONNX for ``a | b`` on sizes (``operator.or_``), which torch.export records from Python
    arithmetic on shapes. MONAI's ``divisible_pad_t`` (the reconstruction networks' padding to a
    multiple) rounds sizes up this way; onnxscript's own translation fails when one side is a
    Python int, so without this those networks export only at a fixed size."""
    from onnxscript import opset18 as op  # ONNX_OPSET

    dtype = getattr(self, "dtype", None) or getattr(other, "dtype", None)
    if dtype is not None and getattr(dtype, "name", "") == "BOOL":
        return op.Or(self, other)
    return op.BitwiseOr(self, other)


def _root_cause(err: BaseException, max_lines: int = 3) -> str:
    """``Type: message`` of the innermost exception (its first lines): the exporter wraps the real
    problem in several layers, and torch.export's messages put the detail on the second line."""
    while err.__cause__ is not None:
        err = err.__cause__
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    return f"{type(err).__name__}: {' '.join(lines[:max_lines])[:600]}"


def _axis_names(ndim: int) -> list[str]:
    return ["batch", "channel", *(f"spatial axis {i}" for i in range(ndim - 2))]


@contextlib.contextmanager
def _quiet_logger(name: str) -> Iterator[None]:
    """``name``'s logger at ERROR for the block: the exporter warns, once per export, about optional
    packages it skips (torchvision's detection ops) in its own line format; medseg's user needs none."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def export_onnx(network: nn.Module, example: torch.Tensor, path: Path, *, dynamic_spatial: bool = True) -> Path:
    """Write ``network`` as an ONNX graph (opset :data:`ONNX_OPSET`), atomically.

    The graph has one input ``image`` (N, C, *spatial) and one output ``output``; the batch axis is
    free (sliding windows come in batches whose last one is smaller), and so are the spatial axes
    with ``dynamic_spatial`` (reconstruction slices of any size). A free spatial axis takes the sizes
    the network itself takes: a U-Net's must still be multiples of its strides' product, and a
    classifier with a flattening head (``lenet``, ``mlp``) takes its training size only; export
    those with ``dynamic_spatial=False``. The file records which weights it was made from
    (:data:`DIGEST_KEY`) and is checked with ``onnx.checker`` before it is renamed into place.

    Export the network as prediction runs it: eval mode, batch norms folded (``fold_batch_norms``).
    Export it before any channels-last conversion: an ONNX graph has no memory format (each
    backend picks its own layout), so a converted network only costs the exporter a copy.

    Args:
        network: the eval-mode network; it is not modified.
        example: one input batch (N, C, *spatial) of the size prediction uses (values do not matter).
        path: the ``.onnx`` file to write; its folder is created.
        dynamic_spatial: leave the spatial axes free; otherwise they are fixed at the example's.

    Returns:
        ``path``.

    Raises:
        ValueError: the network is in training mode, or ``example`` is not a batch.
        UsageError: ``onnx`` or ``onnxscript`` is not installed (the message gives the pip command).
        ModelError: the network cannot be exported as asked (the message names it, why, and the fix).
    """
    example = _export_input(network, example, "export_onnx")
    for package, extra in _EXPORT_PACKAGES:
        _import_package(package, extra, "ONNX export")
    import onnx
    from torch.export import Dim

    name = type(network).__name__
    free_axes = [0, *range(2, example.ndim)] if dynamic_spatial else [0]
    # Dim.DYNAMIC, not AUTO: torch.export refuses to fix an axis asked to be free instead of fixing it
    # silently (and the input check below catches one it fixes all the same)
    dynamic_shapes = ({axis: Dim.DYNAMIC for axis in free_axes},)
    fix = (f"; try dynamic_spatial=False (spatial size fixed at {list(example.shape[2:])})"
           if dynamic_spatial else "")
    try:
        with warnings.catch_warnings(), _quiet_logger("torch.onnx"):
            warnings.simplefilter("ignore", FutureWarning)  # the exporter's deprecation chatter, not the user's
            program = torch.onnx.export(
                network, (example,), None, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                opset_version=ONNX_OPSET, dynamo=True, dynamic_shapes=dynamic_shapes, verbose=False,
                custom_translation_table={operator.or_: _size_bitwise_or})
    except Exception as err:  # the exporter raises many types; what matters is the innermost cause
        raise ModelError(f"{name} could not be exported to ONNX with a free "
                         f"{'batch and spatial axes' if dynamic_spatial else 'batch axis'} "
                         f"(example shape {tuple(example.shape)}): {_root_cause(err)}{fix}") from err
    if program is None:  # only the TorchScript exporter returns None
        raise ModelError(f"{name}: torch.onnx.export returned no ONNX program; this torch ({torch.__version__}) "
                         "does not export with dynamo=True")
    _check_exported_axes(program, name, example, free_axes, fix)
    program.model.metadata_props[DIGEST_KEY] = network_digest(network, example, dynamic_spatial)
    path = Path(path)
    with atomic_path(path) as tmp:
        program.save(tmp, external_data=False)  # one self-contained file: the rename moves all of it
        onnx.checker.check_model(str(tmp), full_check=True)
    log.info("exported %s to %s (ONNX opset %d, free axes: %s)", name, path, ONNX_OPSET,
             ", ".join(_axis_names(example.ndim)[a] for a in free_axes))
    return path


def _check_exported_axes(program: Any, name: str, example: torch.Tensor, free_axes: list[int], fix: str) -> None:
    """Refuse a graph with more than one output, a free axis the exporter fixed, or a batch axis the
    output does not share with the input."""
    outputs = program.model.graph.outputs
    if len(outputs) != 1:
        raise ModelError(f"{name} returns {len(outputs)} outputs; a medseg network returns one tensor "
                         "(deep supervision must be off at prediction)")
    axis_names = _axis_names(example.ndim)
    input_shape = list(program.model.graph.inputs[0].shape or ())
    fixed = {axis: size for axis, size in enumerate(input_shape) if axis in free_axes and isinstance(size, int)}
    if fixed:
        where = ", ".join(f"{axis_names[axis]} (at {size})" for axis, size in fixed.items())
        raise ModelError(f"{name} could not be exported with a free {where}: its forward makes the size a "
                         f"constant (example shape {tuple(example.shape)}){fix if max(fixed) >= 2 else ''}")
    output_shape = list(outputs[0].shape or ())
    if not output_shape or str(output_shape[0]) != str(input_shape[0]):
        # torch.export keeps a hard-coded batch size (x.reshape(2, -1)) without complaint; the graph
        # would then silently mix the images of every batch that is not the example's size
        raise ModelError(f"{name}: the exported output's batch axis is {output_shape[:1]}, not the input's "
                         f"({input_shape[0]}); its forward fixes or mixes the batch (e.g. a reshape with a "
                         "constant batch size). Prediction feeds batches of any size: compute with x.shape[0]")


def export_torchscript(network: nn.Module, example: torch.Tensor, path: Path) -> Path:
    """Write ``network`` traced with ``torch.jit.trace`` on ``example``, atomically.

    For other tools (C++ LibTorch, Triton): medseg never loads TorchScript, a file that is code.
    A trace records the operations the example ran: where the network computes with the input's
    size in Python (the reconstruction networks' padding to a multiple), the trace is valid only
    at the example's spatial size; a warning names the line when torch reports one.

    Args:
        network: the eval-mode network (batch norms folded); it is not modified.
        example: one input batch (N, C, *spatial).
        path: the ``.pt`` file to write; its folder is created.

    Returns:
        ``path``.

    Raises:
        ValueError: the network is in training mode, or ``example`` is not a batch.
        ModelError: the network cannot be traced (the message names it and why).
    """
    example = _export_input(network, example, "export_torchscript")
    name = type(network).__name__
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", torch.jit.TracerWarning)
            traced = torch.jit.trace(network, example)
    except Exception as err:  # tracing fails in many ways; report the innermost cause
        raise ModelError(f"{name} could not be traced to TorchScript (example shape {tuple(example.shape)}): "
                         f"{_root_cause(err)}") from err
    # torch's own layers warn about their input checks (instance norm's size check), which are no
    # computation; a warning from the network's code means a size-dependent value became a constant
    fixed_at = list(dict.fromkeys(f"{Path(w.filename).name}:{w.lineno}" for w in caught
                                  if issubclass(w.category, torch.jit.TracerWarning)
                                  and f"torch{os.sep}nn{os.sep}" not in w.filename))
    if fixed_at:
        log.warning("%s: the TorchScript trace turned values its forward computes from the input size into "
                    "constants (%s); use it only for inputs of shape %s", name, ", ".join(fixed_at),
                    tuple(example.shape[1:]))
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.jit.save(traced, str(tmp))
    log.info("exported %s to %s (TorchScript trace)", name, path)
    return path


def export_network(network: nn.Module, example: torch.Tensor, path: Path, export_format: str, *,
                   dynamic_spatial: bool = True) -> Path:
    """Export in one of :data:`EXPORT_FORMATS` (``medseg export --format``).

    Raises:
        UsageError: an unknown format (the message lists them); see also :func:`export_onnx` and
            :func:`export_torchscript` for what each raises.
    """
    if export_format == ExportFormat.ONNX:
        return export_onnx(network, example, path, dynamic_spatial=dynamic_spatial)
    if export_format == ExportFormat.TORCHSCRIPT:
        return export_torchscript(network, example, path)
    raise UsageError(f"--format {export_format!r} is not an export format; use one of {list(EXPORT_FORMATS)}")


def exported_digest(path: Path) -> str | None:
    """The :data:`DIGEST_KEY` an exported file records, or None (not medseg's, unreadable or missing)."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # a truncated or foreign file: it cannot be reused, whatever the reason
        return None
    return next((p.value for p in model.metadata_props if p.key == DIGEST_KEY), None)


# ----------------------------------------------------------------------------------- backends


class BackendNetwork(nn.Module):
    """An exported ONNX graph run by another runtime, behind the ``nn.Module`` interface.

    ``forward`` takes a batch (N, C, *spatial) on any device (any float dtype: autocast may hand it
    bfloat16) and returns float32 on that device. The module has no parameters: callers that find
    the device from ``next(model.parameters())`` must be given the device instead.

    Attributes:
        backend: the :data:`BACKENDS` name of the runtime.
        onnx_path: the graph it runs.
        input_shape: the graph's input shape, None for a free axis.
    """

    backend: str = ""

    def __init__(self, onnx_path: Path, threads: int | None = None):
        super().__init__()
        self.onnx_path = Path(onnx_path)
        self.sha256 = ""  # the graph's, as checked before it ran (set by backend_network)
        if not self.onnx_path.is_file():
            raise UsageError(f"ONNX model {self.onnx_path}: no such file; export one with `medseg export --format "
                             "onnx` or let prediction export the model's network")
        if threads is not None and threads < 1:
            raise ValueError(f"threads={threads}: must be at least 1, or None for torch.get_num_threads()")
        self.threads = threads or torch.get_num_threads()
        self.input_shape: tuple[int | None, ...] = ()

    def extra_repr(self) -> str:
        return f"backend={self.backend}, onnx_path={self.onnx_path}, threads={self.threads}"

    def check_input(self, shape: tuple[int, ...]) -> None:
        """Refuse an input the graph cannot take, before the runtime fails with its own words.

        Raises:
            ModelError: a different rank, or a size other than the one a fixed axis has.
        """
        wrong = len(shape) != len(self.input_shape) or any(
            want is not None and want != got for want, got in zip(self.input_shape, shape))
        if wrong:
            expected = ", ".join("?" if s is None else str(s) for s in self.input_shape)
            raise ModelError(f"{self.onnx_path} takes inputs of shape ({expected}) (? = any size), got "
                             f"{tuple(shape)}; feed it what the network was exported for, or export it again "
                             "(fixed spatial axes: dynamic_spatial=True where the network allows it)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(tuple(x.shape))
        # the runtimes read numpy from host memory: plain, contiguous (also un-channels-last), float32
        array = x.detach().as_subclass(torch.Tensor).to("cpu", torch.float32).contiguous().numpy()
        out = torch.from_numpy(np.asarray(self.run(array), dtype=np.float32))
        return out.to(x.device)

    def run(self, array: np.ndarray) -> np.ndarray:
        """The graph's output for one float32 batch."""
        raise NotImplementedError


def _static(size: Any) -> int | None:
    return size if isinstance(size, int) and size >= 0 else None


class OnnxRuntimeNetwork(BackendNetwork):
    """The graph run by ONNX Runtime: CUDA when both it and torch have a GPU, else the CPU.

    Args:
        onnx_path: an exported graph with one input and one output.
        threads: intra-op threads; default ``torch.get_num_threads()`` (what medseg configured).

    Raises:
        UsageError: onnxruntime is not installed, or the file is missing.
        ModelLoadError: the file is not a graph ONNX Runtime can load.
        ModelError: the graph does not have one input and one output.
    """

    backend = Backend.ONNXRUNTIME.value

    def __init__(self, onnx_path: Path, threads: int | None = None):
        super().__init__(onnx_path, threads)
        ort = _import_package("onnxruntime", "onnx", "--backend onnxruntime")
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1  # one graph at a time: parallelism is within operators
        # idle ORT threads would otherwise spin between calls and take the cores torch needs to stitch windows
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers = ["CPUExecutionProvider"]
        if "CUDAExecutionProvider" in ort.get_available_providers() and torch.cuda.is_available():
            providers.insert(0, "CUDAExecutionProvider")
        try:
            self.session: Any = ort.InferenceSession(str(self.onnx_path), options, providers=providers)
        except Exception as err:  # onnxruntime raises its own types for a corrupt or unsupported file
            raise ModelLoadError(f"ONNX model {self.onnx_path}: ONNX Runtime cannot load it ({_root_cause(err)}); "
                                 "export it again") from err
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or len(outputs) != 1:
            raise ModelError(f"ONNX model {self.onnx_path} has {len(inputs)} inputs and {len(outputs)} outputs; "
                             "a medseg network has one of each")
        self.input_name, self.output_name = inputs[0].name, outputs[0].name
        self.input_shape = tuple(_static(s) for s in inputs[0].shape)
        log.info("ONNX Runtime runs %s on %s with %d threads", self.onnx_path, providers[0], self.threads)

    def run(self, array: np.ndarray) -> np.ndarray:
        return np.asarray(self.session.run([self.output_name], {self.input_name: array})[0])


class OpenVinoNetwork(BackendNetwork):
    """The graph compiled by OpenVINO for the CPU, at full float32 precision.

    One compiled model with free axes serves every input shape. A model compiled for each shape
    was measured no faster for a 3D U-Net of the demo's size (4 windows of 32x48x32: 36 ms against
    39 ms on 2 cores); only tiny networks gained, by a few milliseconds, for 0.1-0.5 s of compiling.
    OpenVINO's CPU default on processors with bfloat16 units (AMX, AVX512-BF16) is bfloat16
    inference, off from torch by 1e-3 to 1e-1; the precision hint keeps float32.

    Args:
        onnx_path: an exported graph with one input and one output.
        threads: inference threads; default ``torch.get_num_threads()`` (what medseg configured).

    Raises:
        UsageError: openvino is not installed, or the file is missing.
        ModelLoadError: the file is not a graph OpenVINO can read or compile.
        ModelError: the graph does not have one input and one output.
    """

    backend = Backend.OPENVINO.value

    def __init__(self, onnx_path: Path, threads: int | None = None):
        super().__init__(onnx_path, threads)
        ov = _import_package("openvino", "openvino", "--backend openvino")
        core = ov.Core()
        try:
            model = core.read_model(str(self.onnx_path))
            self.compiled: Any = core.compile_model(
                model, "CPU", {"INFERENCE_NUM_THREADS": self.threads, "INFERENCE_PRECISION_HINT": "f32"})
        except Exception as err:  # OpenVINO raises RuntimeError subclasses with its own messages
            raise ModelLoadError(f"ONNX model {self.onnx_path}: OpenVINO cannot read or compile it "
                                 f"({_root_cause(err)}); export it again") from err
        if len(self.compiled.inputs) != 1 or len(self.compiled.outputs) != 1:
            raise ModelError(f"ONNX model {self.onnx_path} has {len(self.compiled.inputs)} inputs and "
                             f"{len(self.compiled.outputs)} outputs; a medseg network has one of each")
        self.input_shape = tuple(d.get_length() if d.is_static else None
                                 for d in self.compiled.inputs[0].get_partial_shape())
        self.request = self.compiled.create_infer_request()
        log.info("OpenVINO runs %s on the CPU with %d threads", self.onnx_path, self.threads)

    def run(self, array: np.ndarray) -> np.ndarray:
        # share_inputs: the array lives through the call; outputs are copied (the request reuses its buffers)
        return np.asarray(self.request.infer({0: array}, share_inputs=True)[0])


_BACKEND_CLASSES: dict[Backend, type[BackendNetwork]] = {
    Backend.ONNXRUNTIME: OnnxRuntimeNetwork, Backend.OPENVINO: OpenVinoNetwork}


def backend_network(network: nn.Module, backend: str, example: torch.Tensor, work_dir: Path,
                    onnx_path: Path | None = None, *, onnx_sha256: str | None = None, dynamic_spatial: bool = True,
                    threads: int | None = None) -> nn.Module:
    """The network prediction runs on ``backend``.

    ``torch``: ``network`` itself. Otherwise the graph at ``onnx_path`` when given and its sha256
    is ``onnx_sha256`` (a ``medseg export`` folder's pinned graph), else ``network`` exported to
    ``work_dir / network.onnx``, a folder made private (0700). An export there is reused while its
    record (``export.json``) says it was made from the same weights and input and the file still
    has the sha256 recorded when it was written; otherwise it is made again. A given graph that is
    not pinned or whose bytes differ is never run: the network is exported instead. Give each
    member of an ensemble its own work folder.

    Args:
        network: the eval-mode network with batch norms folded, before any channels-last conversion.
        backend: one of :data:`BACKENDS`.
        example: one input batch as prediction makes them (e.g. ``sw_batch_size`` windows).
        work_dir: where the export goes; created (0700) if needed.
        onnx_path: an already exported graph to run instead of exporting ``network``.
        onnx_sha256: the sha256 recorded for ``onnx_path`` when it was exported.
        dynamic_spatial: export with free spatial axes (segmentation windows, reconstruction
            slices); False for networks that take one size only (classifiers).
        threads: the backend's threads; default ``torch.get_num_threads()``.

    Returns:
        ``network``, or a :class:`BackendNetwork` whose ``sha256`` is the graph's it checked.

    Raises:
        UsageError: an unknown backend (the message lists :data:`BACKENDS`; a ``ValueError`` too),
            a backend or exporter package that is not installed (the message gives the pip
            command), or an ``onnx_path`` that does not exist.
        ValueError: the network is in training mode.
        ModelError: the network cannot be exported, or the graph does not take ``example``'s shape.
        ModelLoadError: the runtime cannot load the graph.
    """
    if backend not in BACKENDS:
        raise UsageError(f"--backend {backend!r} is not an inference backend; use one of {list(BACKENDS)}")
    chosen = Backend(backend)
    if chosen == Backend.TORCH:
        return network
    package, extra = _BACKEND_PACKAGES[chosen]
    _import_package(package, extra, f"--backend {backend}")  # before a possibly long export
    digest = ""
    if onnx_path is not None and Path(onnx_path).is_file():
        digest = file_sha256(Path(onnx_path))
        if digest != onnx_sha256:
            log.warning("%s is not run: %s; exporting the network again from its verified weights", onnx_path,
                        f"its sha256 {digest[:16]}… is not the {onnx_sha256[:16]}… recorded at export" if onnx_sha256
                        else "no sha256 was recorded for it at export")
            onnx_path = None
    elif onnx_path is not None:
        raise UsageError(f"ONNX model {onnx_path}: no such file; export one with `medseg export --format onnx` or "
                         "let prediction export the model's network")
    if onnx_path is None:
        onnx_path, digest = _cached_export(network, example, Path(work_dir), dynamic_spatial, backend)
    wrapped = _BACKEND_CLASSES[chosen](Path(onnx_path), threads)
    wrapped.sha256 = digest
    wrapped.check_input(tuple(example.shape))
    return wrapped


def _cached_export(network: nn.Module, example: torch.Tensor, work_dir: Path, dynamic_spatial: bool,
                   backend: str) -> tuple[Path, str]:
    """``work_dir / network.onnx`` exported from ``network`` (or reused, when its record and bytes agree)
    and its sha256, checked right before it is handed to the runtime."""
    for export_package, export_extra in _EXPORT_PACKAGES:
        _import_package(export_package, export_extra, f"--backend {backend} (exporting the network to ONNX)")
    work_dir = private_folder(work_dir)
    onnx_path, record_path = work_dir / EXPORTED_NAME, work_dir / EXPORT_RECORD
    wanted = network_digest(network, example, dynamic_spatial)
    record = _read_record(record_path)
    if onnx_path.is_file() and record.get("network_digest") == wanted:
        found = file_sha256(onnx_path)
        if found == record.get("sha256"):
            log.info("reusing %s: exported from these weights (sha256 %s…)", onnx_path, found[:16])
            return onnx_path, found
        log.warning("%s has sha256 %s…, not the %s… recorded when it was exported: it is not run; exporting "
                    "again from the verified weights", onnx_path, found[:16], str(record.get("sha256"))[:16])
    elif onnx_path.exists():
        log.info("%s was exported from other weights or another input; exporting again", onnx_path)
    export_onnx(network, example, onnx_path, dynamic_spatial=dynamic_spatial)
    digest = file_sha256(onnx_path)
    atomic_write_text(record_path, json.dumps({"sha256": digest, "network_digest": wanted}))
    return onnx_path, digest


def _read_record(path: Path) -> dict[str, Any]:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}
