"""Write the datasets the dataset-planning benchmark reads.

Usage:
    python benchmarks/make_datasets.py synthetic-ct --out data/synthetic_ct [--cases 24 --seed 0]
    python benchmarks/make_datasets.py imagefolder --npz ../shared/data/medmnist/pneumoniamnist.npz \\
        --out data/pneumonia_png [--limit-per-split N]
    python benchmarks/make_datasets.py tumour --out data/synthetic_tumour [--train 6 --test 4 --seed 0]

``synthetic-ct``: a seeded CT-like segmentation set (organ, vessel, rare lesion) in case folders,
half DICOM series + DICOM SEG, half NRRD (:func:`medseg.data.synthetic.write_synthetic_ct`).
``imagefolder``: a 2D MedMNIST file as a torchvision ImageFolder PNG tree
(:func:`medseg.data.imagefolder.write_imagefolder_from_medmnist`).
``tumour``: a seeded BraTS-like FLAIR + T1c set in nnU-Net v2 layout, necrosis inside an enhancing
rim inside edema, with small enhancing satellites (:func:`medseg.data.synthetic.write_synthetic_tumour_dataset`).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def _parse_shape(text: str) -> tuple[int, int, int]:
    try:
        x, y, z = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected three integers x,y,z, e.g. 128,128,24") from None
    return x, y, z


def _parse_labels(text: str) -> dict[int, str]:
    try:
        return {int(k): v for k, v in (item.split("=", 1) for item in text.split(","))}
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected index=name pairs, e.g. 0=normal,1=pneumonia") from None


def _synthetic_ct(args: argparse.Namespace) -> None:
    from medseg.data.synthetic import write_synthetic_ct

    start = time.perf_counter()
    summary = write_synthetic_ct(args.out, n_cases=args.cases, seed=args.seed, shape=args.shape,
                                 progress=not args.no_progress)
    formats = [c["format"] for c in summary["cases"]]
    print(f"wrote {len(formats)} cases to {args.out} in {time.perf_counter() - start:.1f} s "
          f"({formats.count('dicom')} DICOM series + SEG, {formats.count('nrrd')} NRRD) and {args.out / 'dataset.json'}")
    fractions = ", ".join(f"{name} {100 * f:.3f} %" for name, f in summary["class_fractions"].items())
    print(f"voxel fractions: {fractions}")
    print(f"lesion in {len(summary['lesion_cases'])} cases: {', '.join(summary['lesion_cases'])}")


def _tumour(args: argparse.Namespace) -> None:
    import nibabel as nib
    import numpy as np

    from medseg.data.synthetic import TUMOUR_LABELS, write_synthetic_tumour_dataset

    start = time.perf_counter()
    out = write_synthetic_tumour_dataset(args.out, n_train=args.train, n_test=args.test, shape=args.shape,
                                         seed=args.seed, progress=not args.no_progress)
    print(f"wrote {args.train} training + {args.test} test cases (FLAIR, T1c) to {out} in "
          f"{time.perf_counter() - start:.1f} s, nnU-Net v2 layout, and {out / 'dataset.json'}")
    counts = np.zeros(len(TUMOUR_LABELS), dtype=np.int64)
    for path in sorted((out / "labelsTr").glob("case_*.nii.gz")):
        counts += np.bincount(np.asarray(nib.load(path).dataobj).ravel(), minlength=len(TUMOUR_LABELS))
    print("training voxel fractions: " + ", ".join(f"{name} {100 * n / counts.sum():.3f} %"
                                                   for name, n in zip(TUMOUR_LABELS.values(), counts)))


def _imagefolder(args: argparse.Namespace) -> None:
    from medseg.data.imagefolder import write_imagefolder_from_medmnist

    start = time.perf_counter()
    result = write_imagefolder_from_medmnist(args.npz, args.out, labels=args.labels,
                                             limit_per_split=args.limit_per_split, progress=not args.no_progress)
    total = sum(sum(c.values()) for c in result["counts"].values())
    kind = "RGB" if result["channels"] == 3 else "grey"
    print(f"wrote {total} {kind} PNGs ({result['size'][0]} x {result['size'][1]}) to {args.out} "
          f"in {time.perf_counter() - start:.1f} s")
    for split, counts in result["counts"].items():
        print(f"  {split}: " + ", ".join(f"{name} {n}" for name, n in counts.items()))
    print(f"ImageFolder class indices: {result['class_to_idx']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    ct = commands.add_parser("synthetic-ct", help="seeded synthetic CT: DICOM series + SEG and NRRD case folders")
    ct.add_argument("--out", type=Path, required=True, help="dataset folder to write")
    ct.add_argument("--cases", type=int, default=24, help="number of cases (default 24)")
    ct.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    ct.add_argument("--shape", type=_parse_shape, default=(128, 128, 24),
                    help="nominal x,y,z size; each case varies around it (default 128,128,24)")
    ct.add_argument("--no-progress", action="store_true", help="no progress bar (cluster logs)")
    ct.set_defaults(run=_synthetic_ct)
    tumour = commands.add_parser("tumour", help="seeded BraTS-like FLAIR + T1c tumours, nnU-Net v2 layout")
    tumour.add_argument("--out", type=Path, required=True, help="dataset folder to write")
    tumour.add_argument("--train", type=int, default=6, help="training cases, imagesTr/labelsTr (default 6)")
    tumour.add_argument("--test", type=int, default=4, help="test cases, imagesTs/labelsTs (default 4)")
    tumour.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    tumour.add_argument("--shape", type=_parse_shape, default=(64, 64, 48), help="x,y,z size (default 64,64,48)")
    tumour.add_argument("--no-progress", action="store_true", help="no progress bar (cluster logs)")
    tumour.set_defaults(run=_tumour)
    folder = commands.add_parser("imagefolder", help="2D MedMNIST .npz -> ImageFolder PNG tree")
    folder.add_argument("--npz", type=Path, required=True, help="a 2D MedMNIST file, e.g. pneumoniamnist.npz")
    folder.add_argument("--out", type=Path, required=True, help="root of the tree to write")
    folder.add_argument("--labels", type=_parse_labels, default=None,
                        help="class names, e.g. 0=normal,1=pneumonia (default: MedMNIST's names)")
    folder.add_argument("--limit-per-split", type=int, default=None, help="first N samples of each split only")
    folder.add_argument("--no-progress", action="store_true", help="no progress bar (cluster logs)")
    folder.set_defaults(run=_imagefolder)
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except (ValueError, ImportError) as err:  # medseg's usage errors (ManifestError...) are ValueErrors
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
