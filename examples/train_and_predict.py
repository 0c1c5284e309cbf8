"""Train the demo U-Net, predict one scan from Python and plot it: medseg as a notebook uses it.

Run from the repository root::

    python examples/train_and_predict.py                  # the demo config as shipped (a few minutes)
    python examples/train_and_predict.py --epochs 2 --out /tmp/medseg-example

Everything here goes through the public API: ``medseg.load_config``, ``medseg.train``,
``medseg.Predictor`` and the :class:`~medseg.Prediction` it returns.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402

import medseg  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SCAN = REPO / "medseg" / "demo" / "hippocampus" / "imagesTr" / "hippocampus_001.nii.gz"


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, help="train this many epochs (default: the config's)")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "example", help="runs, MLflow store and figure")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    # the config names its data relative to itself, so it loads from any folder; only the outputs move
    overrides = [f"output_dir={args.out / 'runs'}", f"tracking.uri=sqlite:///{(args.out / 'mlflow.db').resolve()}"]
    if args.epochs:
        overrides += [f"train.max_epochs={args.epochs}", f"train.val_interval={args.epochs}"]
    cfg = medseg.load_config(REPO / "configs" / "demo_segmentation.yaml", overrides=overrides)

    result = medseg.train(cfg, progress=not args.no_progress)
    if result is None:  # only under torchrun, on the non-main processes
        raise SystemExit(0)
    print(f"trained run {result.run_id}: val Dice {result.metrics.get('best_val/dice_mean')}, model {result.model_uri}")

    predictor = medseg.Predictor.from_uri(result.model_uri, tracking_uri=result.tracking_uri)
    prediction = predictor.predict(SCAN)
    print(f"{SCAN.name}: mask {prediction.label_map.shape}, volumes (mL) "
          + ", ".join(f"{name} {ml:.3f}" for name, ml in prediction.volumes_ml.items()))

    image = np.asarray(nib.load(SCAN).dataobj, dtype=np.float32)
    z = int(np.argmax((prediction.label_map > 0).sum(axis=(0, 1)))) if prediction.label_map.any() else image.shape[2] // 2
    figure, axes = plt.subplots(1, 2, figsize=(8, 4))
    axes[0].imshow(image[:, :, z].T, cmap="gray", origin="lower")
    axes[0].set_title(f"{SCAN.name}, slice {z}")
    axes[1].imshow(image[:, :, z].T, cmap="gray", origin="lower")
    axes[1].imshow(np.ma.masked_equal(prediction.label_map[:, :, z].T, 0), cmap="autumn", alpha=0.6, origin="lower")
    axes[1].set_title("prediction")
    for axis in axes:
        axis.axis("off")
    figure_path = args.out / "prediction.png"
    figure.savefig(figure_path, dpi=100, bbox_inches="tight")
    print(f"figure: {figure_path}")
    return figure_path


if __name__ == "__main__":
    main()
