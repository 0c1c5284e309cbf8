"""``medseg`` command line: parses arguments and dispatches; heavy imports happen inside commands.

Exit codes: 0 success, 1 the work failed (data errors, a failed run), 2 bad usage or config.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import warnings
from pathlib import Path
from typing import Any

log = logging.getLogger("medseg")

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Examples kept as written (the epilogs) and each option's default shown where it has one."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        shown = default not in (None, False, [], argparse.SUPPRESS) and not isinstance(action, argparse._VersionAction)
        if shown and "default" not in text and action.option_strings:
            text += " (default: %(default)s)"
        return text


#: One or two lines a user can copy, per command (``medseg CMD --help`` ends with them).
EXAMPLES = {
    "demo": ["medseg demo", "medseg demo -o /tmp/medseg-demo --set train.max_minutes=1"],
    "run": ["medseg run configs/demo_segmentation.yaml",
            "medseg run configs/hippocampus.yaml --set train.max_minutes=30 --nproc 2",
            "medseg run --plan ../Task04_Hippocampus --budget 30m"],
    "plan": ["medseg plan ../Task04_Hippocampus --budget 30m --out hippocampus/plan.yaml --explain"],
    "pretrain": ["medseg pretrain scans/ --budget 20m --set model.channels=[16,32,64,128] --set patch.size=[32,48,32]",
                 "medseg pretrain --config configs/pretrain_hippocampus.yaml --budget 10m"],
    "validate": ["medseg validate configs/demo_segmentation.yaml --set train.max_epochs=3"],
    "verify": ["medseg verify data_manifests/demo.csv --config configs/demo_segmentation.yaml"],
    "evaluate": ["medseg evaluate masks/ labelsTs/ --labels 1=anterior,2=posterior -o scores/"],
    "evaluate-downstream": ["medseg evaluate-downstream --model runs:/<segmentation run id>/model --pairs pairs.csv "
                            "-o downstream/"],
    "predict": ["medseg predict --model runs:/<run_id>/model -i scans/ -o masks/",
                "medseg predict --model runs/medseg/<parent-timestamp> -i scans/ -o masks/ --tta"],
    "serve": ["medseg serve runs:/<run_id>/model --port 8080",
              "curl -F file=@case.nii.gz http://127.0.0.1:8080/predict -o mask.nii.gz"],
    "export": ["medseg export runs:/<run_id>/model --format onnx --out exported/"],
    "check": ["medseg model check runs:/<run_id>/model"],
    "convert": ["medseg model convert old_model/ --out new_model/ --config runs/x/resolved_config.yaml"],
    "calibrate": ["medseg model calibrate runs/msd_hippocampus/20261201-120000"],
    "build": ["medseg manifest build --from ../Task04_Hippocampus --out data_manifests/hippocampus.csv --folds 5",
              "medseg manifest build --from-medmnist pneumoniamnist.npz --out data_manifests/pneumonia.csv"],
    "volumes": ["medseg manifest volumes data_manifests/msd_hippocampus.csv --root ../Task04_Hippocampus "
                "--labels 1=anterior,2=posterior --out data_manifests/msd_hippocampus_volumes.csv"],
}


def _finish_help(parser: argparse.ArgumentParser) -> None:
    """Every parser and subparser: the formatter above and its examples as the epilog."""
    parser.formatter_class = _HelpFormatter
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                if name in EXAMPLES and child.epilog is None:
                    child.epilog = "examples:\n" + "\n".join(f"  {line}" for line in EXAMPLES[name])
                _finish_help(child)


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", type=Path, help="YAML config, e.g. configs/demo_segmentation.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.max_epochs=5 (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medseg", description="Medical imaging pipelines on MONAI + MLflow.")
    from medseg._version import __version__

    parser.add_argument("--version", action="version", version=__version__, help="print the version and exit")
    loudness = parser.add_mutually_exclusive_group()
    loudness.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    loudness.add_argument("-q", "--quiet", action="store_true",
                          help="warnings and errors only, and each command's closing lines (no per-epoch lines)")
    sub = parser.add_subparsers(dest="command")

    _add_run_and_plan(sub)
    _add_data_commands(sub)
    _add_predict(sub)
    _add_serve_and_export(sub)
    _add_model_and_manifest(sub)
    _finish_help(parser)
    return parser


def _add_run_and_plan(sub: Any) -> None:
    """``run``, ``demo``, ``pretrain`` and ``plan``."""
    run = sub.add_parser("run", help="run the pipeline of a config (verify, train, evaluate, log the model)")
    run.add_argument("config", type=Path, nargs="?",
                     help="YAML config, e.g. configs/demo_segmentation.yaml (or --plan DATASET instead)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config value, e.g. --set train.max_epochs=5 (repeatable)")
    run.add_argument("--plan", type=Path, metavar="DATASET",
                     help="plan the config from this dataset first (as `medseg plan`), write it under configs/planned/ "
                          "and run it; with --budget, --task, --manifest, --root")
    run.add_argument("--budget", default="30m", help="with --plan: the training budget (default 30m)")
    run.add_argument("--task", help="with --plan: the task (default: what the data say)")
    run.add_argument("--manifest", type=Path, help="with --plan: the manifest to use or write")
    run.add_argument("--no-race", action="store_true",
                     help="with --plan: train the rules' choice for the whole budget instead of racing the "
                          "candidates the plan leaves open (successive halving on fold 0)")
    run.add_argument("--root", type=Path, help="with --plan and a manifest: the data root")
    run.add_argument("--unlabelled", type=Path, metavar="FOLDER",
                     help="with --plan: scans without labels; when the budget allows, the plan pretrains on them "
                          "first (medseg pretrain) and fine-tunes from its weights, both in the one budget")
    run.add_argument("--home", type=Path, help="with --plan: the folder for the manifest it builds, the planned config "
                                               "(configs/planned/), the runs and their MLflow store (default: the "
                                               "current folder)")
    run.add_argument("--resume", nargs="?", const=True, default=False, metavar="RUN_DIR",
                     help="continue the newest unfinished run under output_dir, or the given run directory")
    run.add_argument("--no-progress", action="store_true", help="no progress bars (for log files)")
    run.add_argument("--nproc", type=int, default=1, metavar="N",
                     help="train with N processes on this machine (DDP through torchrun; one per GPU, "
                          "or CPU processes sharing the cores). For several machines run "
                          "`torchrun --nnodes ... -m medseg run CONFIG` instead")
    run.add_argument("--deterministic", action="store_true",
                     help="deterministic algorithms and step-based LR schedule: reruns give identical curves")
    repeat = run.add_mutually_exclusive_group()
    repeat.add_argument("--seeds", type=int, metavar="K",
                        help="K runs with seeds seed..seed+K-1, as MLflow children of one parent with mean and std")
    repeat.add_argument("--folds", type=int, metavar="K",
                        help="cross-validation: one child run per fold 0..K-1 of a --folds manifest")

    demo = sub.add_parser("demo", help="train the demo U-Net on the hippocampus crops shipped with medseg (any folder)")
    demo.add_argument("-o", "--out", type=Path, default=Path("medseg-demo"),
                      help="folder for the run and its SQLite MLflow store")
    demo.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                      help="override a demo config value, e.g. --set train.max_minutes=1 (repeatable)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars (for log files)")

    pretrain = sub.add_parser("pretrain", help="pretrain a segmentation U-Net or a classification network (resnet18, "
                              "...) as a masked autoencoder on every image, labelled or not; its weights start a "
                              "run through model.init_from")
    pretrain.add_argument("data", type=Path, nargs="?",
                          help="a folder of scans (searched recursively) or a manifest CSV (labels ignored); "
                               "default: the config's data.manifest")
    pretrain.add_argument("--config", type=Path, help="a task: pretraining YAML (default: the built-in defaults)")
    pretrain.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                          help="override a config value, e.g. --set model.channels=[16,32,64] (repeatable); give "
                               "the model section of the run it will start")
    pretrain.add_argument("--budget", help="training time: 20m, 1h, 600s (default: the config's train budget)")
    pretrain.add_argument("--resume", nargs="?", const=True, default=False, metavar="RUN_DIR",
                          help="continue the newest unfinished pretraining run under output_dir, or the given one")
    pretrain.add_argument("--no-progress", action="store_true", help="no progress bars (for log files)")
    _add_plan(sub)


def _add_plan(sub: Any) -> None:
    """``plan``."""
    plan = sub.add_parser("plan", help="fingerprint a dataset and plan a config for it, a time budget and this machine")
    plan.add_argument("dataset", type=Path, help="dataset folder (MSD, nnU-Net, images/labels, ImageFolder, CSV of "
                                                 "path,label, case folders) or a manifest CSV (with --root)")
    plan.add_argument("--task", help="segmentation, classification, reconstruction or regression (default: what the data say)")
    plan.add_argument("--budget", default="30m", help="training time: 30m, 1.5h, 600s (default 30m)")
    plan.add_argument("--out", type=Path, help="write the commented config here, e.g. mydata/plan.yaml; the manifest "
                                               "it builds (data_manifests/), the runs and their MLflow store (runs/) "
                                               "go beside it")
    plan.add_argument("--manifest", type=Path, help="manifest to use if it exists, else where to write the one built "
                                                    "from the folder (default: data_manifests/<name>.csv beside --out, "
                                                    "else in the current folder)")
    plan.add_argument("--home", type=Path, help="the folder for the manifest it builds, the runs and their MLflow "
                                                "store instead (default: --out's folder, else the current one)")
    plan.add_argument("--root", type=Path, help="data root, when DATASET is a manifest")
    plan.add_argument("--unlabelled", type=Path, metavar="FOLDER",
                      help="a folder of scans without labels: the plan pretrains on them (and the labelled images) "
                           "first when the budget leaves the fine-tuning its step goal; --explain says why or why not")
    plan.add_argument("--name", help="experiment and output folder name (default: the dataset's)")
    plan.add_argument("--device", default="auto", help="plan and probe for this device: auto, cpu, cuda")
    plan.add_argument("--no-probe", action="store_true", help="plan from the rules alone (no timing on this machine)")
    plan.add_argument("--race", action="store_true",
                      help="race the candidates the rules leave open (successive halving on fold 0, at most a third "
                           "of the budget; the runs land in MLflow) and write the winner, its budget less the race")
    plan.add_argument("--explain", action="store_true", help="print every choice beside nnU-Net's default and why")
    plan.add_argument("--no-progress", action="store_true", help="no progress bars (for log files)")


def _add_data_commands(sub: Any) -> None:
    """``validate``, ``verify`` and ``evaluate``."""
    validate = sub.add_parser("validate", help="check a config (keys, values, model) without running it")
    _add_config_args(validate)

    verify = sub.add_parser("verify", help="check a data manifest: files, geometry, labels, leakage")
    verify.add_argument("manifest", type=Path, help="the manifest CSV, e.g. data_manifests/demo.csv")
    verify.add_argument("--root", type=Path, help="data root (default: from --config, else the one `manifest build` "
                                                  "kept in <manifest>.meta.json, else $MEDSEG_DATA_ROOT)")
    verify.add_argument("--config", type=Path, help="take the data root and label map from this config")
    verify.add_argument("--labels", help="allowed label values, comma-separated, e.g. 0,1,2")
    verify.add_argument("--report", type=Path, help="where to write the JSON report (default: beside the manifest)")
    verify.add_argument("--no-progress", action="store_true", help="no progress bars (for log files)")

    evaluate = sub.add_parser("evaluate", help="score a folder of predicted masks against reference masks "
                                               "(Dice, HD95 mm, volumes mL per case and label)")
    evaluate.add_argument("predictions", type=Path, help="folder of predicted masks (medseg predict's --output)")
    evaluate.add_argument("references", type=Path, help="folder of reference masks of the same names (labelsTs)")
    evaluate.add_argument("--labels", help="value=name pairs to score, e.g. 1=anterior,2=posterior "
                                           "(default: every non-zero value in the references)")
    evaluate.add_argument("-o", "--output", type=Path, help="write scores.csv and scores.json here")

    downstream = sub.add_parser("evaluate-downstream", help="judge enhanced images (super-resolved, reconstructed) by "
                                "a frozen segmentation model: Dice per kind of input beside PSNR/SSIM")
    downstream.add_argument("--model", required=True, help="the frozen segmentation model: runs:/<id>/model, "
                            "models:/<name>/<version> or a model folder")
    downstream.add_argument("--pairs", required=True, type=Path, help="CSV with columns case_id, kind, image, "
                            "reference, label (paths relative to it); kinds e.g. sr, trilinear, bspline, original")
    downstream.add_argument("-o", "--output", required=True, type=Path, help="write masks/, downstream.csv and "
                            "downstream.json here")
    downstream.add_argument("--labels", help="value=name pairs to score (default: the model's labels)")
    downstream.add_argument("--tracking-uri", help="MLflow store of the model and of the scores' run (default: "
                            "$MLFLOW_TRACKING_URI, else sqlite:///runs/mlflow.db)")
    downstream.add_argument("--experiment", default="downstream", help="MLflow experiment of the scores' run")
    downstream.add_argument("--no-log", action="store_true", help="do not log the scores to MLflow")
    downstream.add_argument("--device", default="auto", help="auto, cpu, cuda")
    downstream.add_argument("--no-progress", action="store_true", help="no progress bars (for log files)")


def _add_predict(sub: Any) -> None:
    """``predict``."""
    predict = sub.add_parser("predict", help="predict every scan in a folder with a trained model")
    predict.add_argument("--model", required=True, action="append",
                         help="MLflow model URI (runs:/<id>/model, models:/<name>/<version>, models:/m-...) or folder; "
                              "repeat it, or give a --seeds/--folds parent (runs:/<parent id> or its run directory), "
                              "to average an ensemble")
    # text, not Path: a file:// URI keeps its two slashes (medseg.io.uris.local_folder reads it)
    predict.add_argument("-i", "--input", required=True,
                         help="folder of scans (searched recursively), one file, or a .csv/.parquet table whose "
                              "'path' column lists the scans (paths, file:// or fsspec URIs such as s3://...)")
    predict.add_argument("-o", "--output", required=True,
                         help="folder for masks and the report: a path, or an fsspec URI (s3://bucket/prefix, "
                              "gs://..., az://...; pip install s3fs, gcsfs or adlfs) where each case's files are put "
                              "whole and the report when the batch ends")
    predict.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    predict.add_argument("--overlap", type=float, help="sliding-window overlap (default: the model's contract)")
    predict.add_argument("--tta", action="store_true",
                         help="average predictions over the axis flips the model was trained with (segmentation, "
                              "classification, detection; super-resolution in-plane)")
    predict.add_argument("--overwrite", action="store_true", help="redo cases whose output exists")
    predict.add_argument("--num-parts", type=int, default=1, help="split the folder into N shards ...")
    predict.add_argument("--part-id", type=int, default=0, help="... and predict shard I (0-based)")
    predict.add_argument("--save-probabilities", action="store_true", help="also write <case>_probabilities.nii.gz")
    predict.add_argument("--save-uncertainty", action="store_true",
                         help="also write <case>_entropy.nii.gz and, with --tta or an ensemble, <case>_variance.nii.gz")
    predict.add_argument("--measured", action="store_true",
                         help="reconstruction (CT, denoising): the inputs already are the degraded images (FBP, "
                         "noisy scans); default: fully sampled images whose measurement is simulated")
    predict.add_argument("--qc", action="append", type=_qc_threshold, metavar="KEY=VALUE",
                         help="QC threshold instead of the model's (repeatable); the keys depend on the task: "
                              "segmentation max_abs_volume_z, max_mean_entropy, min_agreement; detection min_boxes, "
                              "max_confident_boxes, min_top_score, max_edge_boxes (an unknown key is refused with "
                              "the model's list); a case passing one gets qc_flag and the reason")
    predict.add_argument("--allow-constant", action="store_true",
                         help="accept images with one value everywhere (refused by default: usually a blank export)")
    predict.add_argument("--keep-largest", action=argparse.BooleanOptionalAction, default=None,
                         help="keep the largest component per label (default: the model's contract)")
    predict.add_argument("--tracking-uri", help="MLflow store for model URIs and the inference run "
                                                "(default: $MLFLOW_TRACKING_URI, else sqlite:///runs/mlflow.db)")
    predict.add_argument("--experiment", default="medseg-predict", help="MLflow experiment of the inference run")
    predict.add_argument("--no-tracking", action="store_true", help="do not log the batch as an MLflow run")
    predict.add_argument("--backend", choices=["auto", "torch", "onnxruntime", "openvino"],
                         help="what runs the network: torch, or the network exported to ONNX and run by ONNX "
                              "Runtime or OpenVINO (pip install 'medseg[onnx]' / 'medseg[openvino]'), or auto: the "
                              "fastest measured one installed (openvino, else torch) on a CPU, torch on a GPU; default "
                              "$MEDSEG_BACKEND, else auto")
    predict.add_argument("--no-review", action="store_true",
                         help="do not write review.html (every case's row and thumbnail, worst QC first)")
    predict.add_argument("--no-progress", action="store_true", help="no progress bars (for log files)")
    _add_ray_flags(predict)


def _add_ray_flags(predict: Any) -> None:
    """``predict --engine ray`` and its cluster and actor flags."""
    ray = predict.add_argument_group("Ray engine", "run the cases on Ray Data actors (pip install 'medseg[ray]'); "
                                     "docs/how-to/cluster.md")
    ray.add_argument("--engine", choices=["local", "ray"], default="local",
                     help="local: this process (default); ray: an actor pool that loads the model once per actor")
    ray.add_argument("--ray-address", help="a Ray cluster (ray://head:10001, auto); default $RAY_ADDRESS, else a "
                                           "local Ray runtime for this batch")
    ray.add_argument("--ray-actors", type=int, default=1, help="actors in the pool (default 1)")
    ray.add_argument("--ray-cpus-per-actor", type=float, default=1.0, help="CPUs per actor (default 1)")
    ray.add_argument("--ray-gpus-per-actor", type=float, default=0.0, help="GPUs per actor (default 0; 1: one each)")
    ray.add_argument("--ray-local-cpus", type=int, help="CPUs of a local Ray runtime (default: this machine's)")
    ray.add_argument("--ray-dashboard", action="store_true", help="start the dashboard with a local runtime (:8265)")
    ray.add_argument("--ray-io-actors", type=int, help="workers reading and writing, each stage (default: --ray-actors)")
    ray.add_argument("--ray-io-cpus", type=float, default=0.0,
                     help="CPUs per reading/writing worker (default 0: they share the CPUs the actors leave)")


def _add_serve_and_export(sub: Any) -> None:
    """``serve`` and ``export``."""
    serve = sub.add_parser("serve", help="serve a model over HTTP to untrusted clients: scans in, masks and rows out "
                                         "(see docs/serving.md)")
    serve.add_argument("model", help="model URI or folder (as for predict --model)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=8080, help="TCP port to listen on")
    serve.add_argument("--device", default="cpu", help="where every prediction runs (fixed here, never per request)")
    serve.add_argument("--backend", choices=["auto", "torch", "onnxruntime", "openvino"],
                       help="what runs the network (as for predict; default $MEDSEG_BACKEND, else auto)")
    serve.add_argument("--tracking-uri", help="MLflow store of a runs:/ or models:/ model")
    serve.add_argument("--max-body-mb", type=float, help="largest request body (default 256; $MEDSEG_SERVE_MAX_BODY_MB)")
    serve.add_argument("--max-voxels", type=int, help="most voxels in one scan, from its header (default 512^3)")
    serve.add_argument("--max-decompressed-mb", type=float, help="what a .gz or .zip upload may unpack to (default 1024)")
    serve.add_argument("--timeout-s", type=float, help="one request's prediction; then its worker is killed and the "
                                                       "client gets 504 (default 300)")
    serve.add_argument("--max-concurrent", type=int, help="predictions at once, one worker process each "
                                                          "(default: from available memory and the model)")
    serve.add_argument("--queue", type=int, help="requests that may wait for a worker; more get 429 (default 8)")
    serve.add_argument("--max-rows", type=int, help="paths in one path-mode request (default 100000)")
    serve.add_argument("--work-dir", type=Path, help="0700 folder for each request's private temporary folder "
                                                     "(default <temp>/medseg-serve-<uid>)")
    serve.add_argument("--input-root", type=Path, help="path mode (with --output-root): requests may name files "
                                                       "under this folder")
    serve.add_argument("--output-root", type=Path, help="path mode: each request's outputs go to a fresh folder here")

    export = sub.add_parser("export", help="export a model's network (ONNX or TorchScript) with its contract")
    export.add_argument("model", help="model URI or folder (as for predict --model)")
    export.add_argument("--format", default="onnx", choices=["onnx", "torchscript"],
                        help="ONNX (ONNX Runtime, OpenVINO, TensorRT) or TorchScript (libtorch)")
    export.add_argument("--out", type=Path, required=True, help="folder to write (model files + network)")
    export.add_argument("--tracking-uri", help="MLflow store of a runs:/ or models:/ model")


def _add_model_and_manifest(sub: Any) -> None:
    """``model check|convert|calibrate`` and ``manifest build``."""
    model = sub.add_parser("model", help="model files")
    model_sub = model.add_subparsers(dest="model_command")
    check = model_sub.add_parser(
        "check", help="verify a model folder or URI before anyone loads it: medseg's own loader, no code, no "
                      "pickle, every file's recorded sha256 (exit 1 naming each tampering)")
    check.add_argument("model", help="model URI or folder (as for predict --model)")
    check.add_argument("--tracking-uri", help="MLflow store of a runs:/ or models:/ model")
    convert = model_sub.add_parser(
        "convert", help="convert a pickled model or state dict (an older medseg, torch.save) into medseg's safe "
                        "format; this unpickles the source once, so only convert what you trust")
    convert.add_argument("source", help="a .pt/.pth state dict, or an older medseg model (folder or runs:/ URI)")
    convert.add_argument("--out", type=Path, required=True,
                         help="the .safetensors file (state dict) or the model folder (model) to write")
    convert.add_argument("--config", type=Path, help="for a model: the config it was trained with "
                                                     "(its run folder's resolved_config.yaml)")
    convert.add_argument("--tracking-uri", help="MLflow store of a runs:/ or models:/ source")

    calibrate = model_sub.add_parser(
        "calibrate", help="fit a finished run's temperature on its validation split and log the calibrated model "
                          "(for runs trained before medseg calibrated, or with validation.calibrate: false)")
    calibrate.add_argument("run_dir", type=Path, help="the run folder, e.g. runs/msd_hippocampus/20261201-120000")
    calibrate.add_argument("--no-progress", action="store_true", help="no progress bars (for logs)")

    manifest = sub.add_parser("manifest", help="data manifests")
    msub = manifest.add_subparsers(dest="manifest_command")
    build = msub.add_parser("build", help="build a manifest from a dataset folder (MSD, nnU-Net with _0000 channel "
                                           "files, images/ + labels/, ImageFolder class folders, a CSV of path,label, "
                                           "case folders of image + label) or import a MedMNIST .npz file")
    source = build.add_mutually_exclusive_group(required=True)
    source.add_argument("--from", dest="source", type=Path, help="dataset folder (the data root), or a CSV of "
                                                                 "path,label[,split] in it")
    source.add_argument("--from-medmnist", type=Path, metavar="FILE.npz",
                        help="MedMNIST file (2D or 3D): writes one image per sample under --data-dir and keeps "
                             "the official train/val/test split")
    build.add_argument("--out", type=Path, required=True, help="CSV to write, e.g. data_manifests/mydata.csv")
    build.add_argument("--data-dir", type=Path,
                       help="with --from-medmnist: folder for the images, the data root of the manifest "
                            "(default: data/<file name> under the working directory)")
    build.add_argument("--labels", help="with --from-medmnist: class names, e.g. 0=normal,1=pneumonia "
                                        "(default: MedMNIST's names for the known sets)")
    build.add_argument("--seed", type=int, default=0, help="seed of the random split")
    build.add_argument("--val-fraction", type=float, default=0.2, help="share of the cases for validation")
    build.add_argument("--test-fraction", type=float, default=0.0,
                       help="share of the cases held out for testing (a test folder such as imagesTs is better)")
    build.add_argument("--folds", type=int, help="k folds instead of a train/val split")
    build.add_argument("--subject-pattern", help="regex with a (?P<subject>...) group applied to case ids")
    build.add_argument("--limit", type=int, help="keep only the first N cases")
    volumes = msub.add_parser("volumes", help="write each labelled case's structure volumes in mL (voxel count x "
                                              "voxel volume from the header): regression targets")
    volumes.add_argument("manifest", type=Path, help="manifest whose label column holds label maps")
    volumes.add_argument("--root", type=Path, required=True, help="the data root the manifest's paths are under")
    volumes.add_argument("--labels", required=True, help="label value=structure name, e.g. 1=anterior,2=posterior; "
                                                         "each becomes a column <name>_ml")
    volumes.add_argument("--out", type=Path, required=True, help="CSV of case_id,<name>_ml... to write")



def _qc_threshold(text: str) -> tuple[str, float]:
    key, sep, value = text.partition("=")
    try:
        if not sep:
            raise ValueError
        return key.strip(), float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected KEY=NUMBER, e.g. max_abs_volume_z=3, got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    _quiet_third_parties()
    if hasattr(args, "no_progress") and not sys.stderr.isatty():
        args.no_progress = True  # bars only on a terminal: in a log file they are thousands of lines
    if getattr(args, "no_progress", False):
        import os

        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    handlers = {"demo": _cmd_demo, "run": _cmd_run, "pretrain": _cmd_pretrain, "plan": _cmd_plan, "validate": _cmd_validate, "verify": _cmd_verify, "manifest": _cmd_manifest,
                "predict": _cmd_predict, "model": _cmd_model,
                "export": _cmd_export, "serve": _cmd_serve, "evaluate": _cmd_evaluate}
    handlers["evaluate-downstream"] = _cmd_evaluate_downstream
    if args.command not in handlers:
        parser.print_help()
        return EXIT_USAGE
    from medseg.errors import UsageError, medseg_cause

    try:
        _preload_allocator(in_process=argv is not None)
        return handlers[args.command](args)
    except Exception as err:
        known = medseg_cause(err)  # MONAI and torch wrap medseg's errors; the root cause has the message
        if known is None:
            raise
        print(f"error: {known}", file=sys.stderr)
        return EXIT_USAGE if isinstance(known, UsageError) else EXIT_FAILED


def _preload_allocator(in_process: bool) -> None:
    """``MEDSEG_ALLOCATOR=jemalloc``: run this command again with jemalloc preloaded (a library
    can only replace malloc before the process starts). Raises UsageError when it is missing."""
    import os

    from medseg.allocator import jemalloc_environment

    env = jemalloc_environment()
    if env is not None and not in_process:
        log.info("re-running under %s", env["LD_PRELOAD"].split(":")[0])
        os.execve(sys.executable, [sys.executable, "-m", "medseg", *sys.argv[1:]], env)


#: Packages whose FutureWarnings (deprecations addressed to medseg, not to its user) are not shown.
THIRD_PARTY_MODULES = ("monai", "torch", "mlflow", "pydantic", "SimpleITK", "onnx", "onnxscript", "openvino")


def _quiet_third_parties() -> None:
    import os

    # MLflow configures its own loggers at import (INFO: "Creating initial MLflow database tables",
    # system-metrics start/stop); its own variable sets their level, so a user's choice still wins
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    # MLflow's usage telemetry writes ~/.config/mlflow and calls home; scans are often handled on
    # machines that must not. MLFLOW_DISABLE_TELEMETRY=false turns it back on (docs/how-to/compare-runs.md)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    warnings.filterwarnings("ignore", message=".*NvImgCodec.*")
    # deprecation notices meant for the libraries' own callers (MONAI's metric arguments, torch's
    # amp names), by the module that raises them: a user's script keeps its own FutureWarnings
    for module in THIRD_PARTY_MODULES:
        warnings.filterwarnings("ignore", category=FutureWarning, module=rf"{module}(\.|$)")
    for name in ("mlflow", "alembic", "urllib3", "matplotlib"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # MONAI says at import that an optional GPU DICOM decoder is missing; medseg reads DICOM with SimpleITK
    logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)


def _run_argv(args: argparse.Namespace) -> list[str]:
    """The ``run`` arguments each distributed worker gets (everything but ``--nproc``)."""
    argv = (["--verbose"] if args.verbose else ["--quiet"] if args.quiet else []) + ["run", str(args.config),
                                                       *[f"--set={item}" for item in args.overrides]]
    if args.resume:
        argv += ["--resume"] + ([str(args.resume)] if isinstance(args.resume, str) else [])
    for flag in ("no_progress", "deterministic"):
        if getattr(args, flag):
            argv.append("--" + flag.replace("_", "-"))
    for option in ("seeds", "folds"):
        if getattr(args, option) is not None:
            argv += [f"--{option}", str(getattr(args, option))]
    return argv


def _cmd_run(args: argparse.Namespace) -> int:
    import os

    import medseg
    from medseg.errors import UsageError

    if (args.config is None) == (args.plan is None):
        raise UsageError("medseg run: give a CONFIG, or --plan DATASET (not both)")
    if args.plan is not None:
        planned = medseg.plan(args.plan, task=args.task, budget=args.budget, manifest=args.manifest, root=args.root,
                              home=args.home, progress=not args.no_progress, unlabelled=args.unlabelled)
        if not args.no_race:
            raced = medseg.race_plan(planned, progress=not args.no_progress)
            if raced is not None:
                print(f"race: {raced.winner.name} won ({raced.minutes_used:.1f} min); runs under "
                      f"{planned.config['output_dir']}/race")
        args.config = (args.home or Path()) / "configs" / "planned" / f"{planned.request.name}_{args.budget}.yaml"
        planned.write(args.config)
        print(f"planned config: {args.config}")
    overrides = list(args.overrides) + (["train.deterministic=true"] if args.deterministic else [])
    cfg = medseg.load_config(args.config, overrides)  # checked before any worker starts
    if args.nproc < 1:
        raise UsageError(f"--nproc {args.nproc}: must be at least 1")
    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        from medseg.engine import distributed

        distributed.launch(_run_argv(args), args.nproc, cfg.train.device)
        return EXIT_OK
    resume = args.resume if isinstance(args.resume, str) else bool(args.resume)
    result = medseg.train(cfg, resume=resume, progress=not args.no_progress, seeds=args.seeds, folds=args.folds)
    return _report_run(result, str(cfg.task))


def _cmd_demo(args: argparse.Namespace) -> int:
    import medseg

    return _report_run(medseg.demo(args.out, overrides=args.overrides, progress=not args.no_progress), "segmentation")


def _cmd_pretrain(args: argparse.Namespace) -> int:
    import medseg

    resume = args.resume if isinstance(args.resume, str) else bool(args.resume)
    result = medseg.pretrain(args.data, config=args.config, overrides=args.overrides, budget=args.budget,
                             resume=resume, progress=not args.no_progress)
    if result is None:
        return EXIT_OK
    loss = result.run.metrics.get("train/loss")
    print(f"pretraining run {result.run_id} finished: {len(result.tensors)} tensors"
          + (f", train/loss={loss:.4f}" if loss is not None else ""))
    print(f"weights: {result.weights}")
    print(f"start a segmentation run from them: medseg run CONFIG --set model.init_from={result.weights}")
    print(f"summary: {result.run.summary_path}")
    return EXIT_OK


def _report_run(result: Any, task: str) -> int:
    """What a finished run prints: its headline figures, children, model, MLflow UI and summary."""
    import medseg

    if result is None:  # a non-main process of a distributed run: the main one reports
        return EXIT_OK
    summary = json.loads(result.summary_path.read_text())
    shown = medseg.headline(result.metrics, medseg.get_task(task).headline_metrics)
    print(f"run {result.run_id} finished: " + ", ".join(f"{k}={v:.4f}" for k, v in shown.items() if v is not None))
    for child in result.children:
        print(f"  {child['name']}: run {child['run_id']}, " + ", ".join(
            f"{k}={v:.4f}" for k, v in child["metrics"].items() if k in shown and v is not None))
    print(f"model: {result.model_uri}")
    print(f"MLflow UI: {summary['mlflow_ui']}")
    print(f"summary: {result.summary_path}")
    return EXIT_OK


def _cmd_plan(args: argparse.Namespace) -> int:
    import medseg

    planned = medseg.plan(args.dataset, task=args.task, budget=args.budget, root=args.root, manifest=args.manifest,
                          out=None if args.race else args.out, device=args.device, name=args.name,
                          probe=not args.no_probe, progress=not args.no_progress,
                          home=args.home or (None if args.out is None else args.out.parent),
                          unlabelled=args.unlabelled)
    if args.race:
        raced = medseg.race_plan(planned, progress=not args.no_progress)
        if raced is not None:
            print("race (successive halving, fold 0 held out):\n" + "\n".join(raced.table()) + "\n")
        if args.out is not None:
            planned.write(args.out)
    header = planned.header()
    if args.out is not None and not args.explain:  # the file keeps the whole header (probe timings included)
        header = header[:2] + [line for line in header[2:] if line.startswith("Note:")]
    print("\n".join(header))
    if args.explain:
        print()
        print(planned.explain())
    if args.out is not None:
        print(f"\nconfig: {args.out}  (its header has the probe's timings; --explain prints every choice)"
              + (f"\npretraining: {planned.config['pretrain']}  (run first by `medseg run`)"
                 if planned.pretraining is not None else "") + f"\nrun it: medseg run {args.out}")
    else:
        print()
        print(planned.to_yaml())
        if planned.pretraining is not None:
            print(planned.pretraining_yaml())
    return EXIT_OK


def _cmd_validate(args: argparse.Namespace) -> int:
    import medseg

    cfg = medseg.load_config(args.config, args.overrides)
    task, model, shape = medseg.describe(cfg)
    params = sum(p.numel() for p in model.parameters())
    print(f"{args.config}: valid ({task.name}, model {cfg.model.name} with {params / 1e6:.2f} M parameters, "
          f"{shape}, manifest {cfg.data.manifest})")
    return EXIT_OK


def _cmd_verify(args: argparse.Namespace) -> int:
    import medseg
    from medseg.errors import ConfigError

    labels: list[int] | None = None
    if args.labels:
        try:
            labels = [int(v) for v in args.labels.split(",")]
        except ValueError:
            raise ConfigError(f"--labels {args.labels!r}: expected comma-separated integers, e.g. 0,1,2") from None
    report_path = args.report or args.manifest.with_suffix(".verify.json")
    report = medseg.verify(args.manifest, config=args.config, root=args.root, labels=labels, report=report_path,
                           progress=not args.no_progress)
    print(report.summary())
    print(f"report: {report_path}")
    return EXIT_OK if report.ok else EXIT_FAILED


def _cmd_predict(args: argparse.Namespace) -> int:
    import medseg
    from medseg.tracking import MlflowTracker

    predictor = medseg.Predictor.from_uri(args.model, device=args.device, tracking_uri=args.tracking_uri,
                                          tta=args.tta, overlap=args.overlap, keep_largest=args.keep_largest,
                                          measured=args.measured, backend=args.backend,
                                          allow_constant=args.allow_constant, qc=dict(args.qc or []))
    tracker = None
    if not args.no_tracking:
        tracker = MlflowTracker(predictor.tracking_uri, args.experiment)
        tracker.start(f"predict-{Path(args.input).resolve().name}", {"medseg_task": "predict",
                                                                      "task": predictor.task.name})
    try:
        batch = predictor.predict_folder(args.input, args.output, overwrite=args.overwrite,
                                         save_probabilities=args.save_probabilities,
                                         save_uncertainty=args.save_uncertainty, num_parts=args.num_parts,
                                         part_id=args.part_id, progress=not args.no_progress, tracker=tracker,
                                         review=not args.no_review, engine=args.engine, ray=_ray_options(args))
    except BaseException:
        if tracker is not None:
            tracker.end("FAILED")
        raise
    summary = batch.summary_dict()
    if tracker is not None:
        tracker.end("FINISHED" if batch.n_failed == 0 else "FAILED")
    counts = batch.counts
    print(f"predicted {summary['cases']} case(s) on {summary['device']}: {counts['ok']} ok, {counts['failed']} failed, "
          f"{counts['skipped']} skipped; peak RSS {summary['peak_rss_mb']:.0f} MiB")
    means = {k: v for k, v in summary.get("mean_metrics", {}).items() if v is not None}
    if means:
        print("mean over cases: " + ", ".join(f"{k} {v:.4f}" for k, v in means.items()))
    for case_id, error in summary["failed"].items():
        print(f"  FAILED {case_id}: {error}")
    print(f"report: {batch.report_location}")
    print(f"summary: {batch.summary_location}")
    if summary.get("review"):
        print(f"review: {summary['review']}")
    return EXIT_OK if batch.n_failed == 0 else EXIT_FAILED


def _ray_options(args: argparse.Namespace) -> Any:
    """The Ray engine's options from ``predict``'s flags (None with ``--engine local``)."""
    if args.engine != "ray":
        return None
    from medseg.engine.ray_predict import RayOptions

    return RayOptions(address=args.ray_address, actors=args.ray_actors, cpus_per_actor=args.ray_cpus_per_actor,
                      gpus_per_actor=args.ray_gpus_per_actor, local_cpus=args.ray_local_cpus,
                      dashboard=args.ray_dashboard, io_actors=args.ray_io_actors, io_cpus=args.ray_io_cpus)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    import medseg

    scores = medseg.evaluate(args.predictions, args.references, labels=args.labels, out=args.output)
    print(scores.table())
    print(f"{scores.scored} cases scored" + (f", {len(scores.failed)} failed" if scores.failed else "")
          + (f", {len(scores.unpaired)} predictions without a reference" if scores.unpaired else ""))
    for case_id, why in scores.failed.items():
        print(f"  FAILED {case_id}: {why}")
    for name, path in scores.files.items():
        print(f"{name}: {path}")
    return EXIT_OK if not scores.failed else EXIT_FAILED


def _cmd_evaluate_downstream(args: argparse.Namespace) -> int:
    import medseg

    scores = medseg.evaluate_downstream(args.model, args.pairs, args.output, labels=args.labels,
                                        tracking_uri=args.tracking_uri, device=args.device,
                                        experiment=None if args.no_log else args.experiment,
                                        progress=not args.no_progress)
    print(scores.table())
    failed = [r for r in scores.rows if r["status"] != "ok"]
    for row in failed:
        print(f"  FAILED {row['case_id']} ({row['kind']}): {row['error']}")
    for name, path in scores.files.items():
        print(f"{name}: {path}")
    if scores.run_id:
        print(f"MLflow run: {scores.run_id}")
    return EXIT_OK if not failed else EXIT_FAILED


def _cmd_serve(args: argparse.Namespace) -> int:
    from medseg.serving.guard import ServeLimits
    from medseg.serving.server import ServeOptions, run

    limits = ServeLimits.from_env(
        max_body_mb=args.max_body_mb, max_voxels=args.max_voxels, max_decompressed_mb=args.max_decompressed_mb,
        timeout_s=args.timeout_s, max_concurrent=args.max_concurrent, queue=args.queue, max_rows=args.max_rows,
        work_dir=args.work_dir, input_root=args.input_root, output_root=args.output_root)
    run(ServeOptions(args.model, limits, args.device, args.backend, args.tracking_uri), args.host, args.port)
    return EXIT_OK


def _cmd_export(args: argparse.Namespace) -> int:
    import medseg

    written = medseg.export_model(args.model, args.out, args.format, tracking_uri=args.tracking_uri)
    print(f"exported: {written}")
    return EXIT_OK


def _model_check(args: argparse.Namespace) -> int:
    from medseg.api import check_model

    result = check_model(args.model, tracking_uri=args.tracking_uri)
    if not result.ok:
        print(f"error: {result.message(args.model)}", file=sys.stderr)
        return EXIT_FAILED
    print(f"{args.model}: as medseg wrote it ({result.layout}); {len(result.verified)} file(s) match their recorded "
          "sha256; no code, no pickle")
    for rel, digest in sorted(result.verified.items()):
        print(f"  {rel}  sha256 {digest}")
    if result.layout == "legacy":
        print("  note: logged from code by an earlier medseg: medseg reads it without running python_model.py, but "
              "mlflow.pyfunc.load_model runs that file; log it again (medseg run) for a model without code")
    return EXIT_OK


def _cmd_model(args: argparse.Namespace) -> int:
    import medseg

    if args.model_command == "calibrate":
        result = medseg.calibrate_run(args.run_dir, progress=not args.no_progress)
        shown = {k: v for k, v in result.metrics.items()
                 if v is not None and (k == "calibration/temperature" or k.startswith("test/ece"))}
        print(f"calibrated run {result.run_id}: " + ", ".join(f"{k}={v:.4f}" for k, v in sorted(shown.items())))
        print(f"model: {result.model_uri}")
        return EXIT_OK
    if args.model_command == "check":
        return _model_check(args)
    if args.model_command != "convert":
        print("usage: medseg model convert SOURCE --out PATH [--config CONFIG] | medseg model calibrate RUN_DIR | "
              "medseg model check MODEL",
              file=sys.stderr)
        return EXIT_USAGE
    written = medseg.convert_model(args.source, args.out, config=args.config, tracking_uri=args.tracking_uri)
    print(f"converted: {written}")
    return EXIT_OK


def _cmd_manifest(args: argparse.Namespace) -> int:
    import medseg
    from medseg.api import manifest_summary

    if args.manifest_command == "volumes":
        return _write_volumes(args)
    if args.manifest_command != "build":
        build_parser().parse_args(["manifest", "--help"])
        return EXIT_USAGE
    if args.from_medmnist is not None:
        return _import_medmnist(args)
    layout = medseg.detect_layout(args.source)
    print(layout.describe())
    manifest = medseg.build_manifest_from_layout(layout, args.out, seed=args.seed, val_fraction=args.val_fraction,
                                          test_fraction=args.test_fraction, folds=args.folds,
                                          subject_pattern=args.subject_pattern, limit=args.limit)
    splits = manifest_summary(manifest)
    print(f"{args.out}: {len(manifest.cases)} cases ({', '.join(f'{k}: {v}' for k, v in splits.items())}); "
          f"paths relative to {args.source}; root and labels kept in {args.out.with_suffix('.meta.json')}, so "
          f"`medseg verify {args.out}` needs no --root")
    return EXIT_OK


def _write_volumes(args: argparse.Namespace) -> int:
    from medseg.api import parse_label_names
    from medseg.data.manifest import read_manifest
    from medseg.data.targets import write_structure_volumes

    labels = parse_label_names(args.labels)
    out = write_structure_volumes(read_manifest(args.manifest), args.root, labels, args.out)
    print(f"{out}: volumes in mL of {', '.join(labels.values())}; use it as data.targets.file of a regression config "
          f"with data.targets.columns {[f'{name}_ml' for name in labels.values()]}")
    return EXIT_OK


def _import_medmnist(args: argparse.Namespace) -> int:
    import medseg
    from medseg.api import manifest_summary, parse_label_names

    labels = parse_label_names(args.labels) if args.labels else None
    data_dir = args.data_dir or Path("data") / args.from_medmnist.name.removesuffix(".npz")
    imported = medseg.import_medmnist(args.from_medmnist, args.out, data_dir, labels, limit=args.limit)
    splits = manifest_summary(imported.manifest)
    print(f"{args.out}: {len(imported.manifest.cases)} cases ({', '.join(f'{k}: {v}' for k, v in splits.items())}), "
          f"{imported.spatial_dims}D, {imported.channels} channel(s), size {list(imported.size)}; images in {data_dir}")
    print("config:\n  task: classification\n  data:\n"
          f"    manifest: {args.out}\n    root: {data_dir}\n    labels: {imported.labels}\n"
          f"    channels: {['red', 'green', 'blue'] if imported.channels == 3 else ['image']}\n"
          f"  model: {{spatial_dims: {imported.spatial_dims}}}")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
