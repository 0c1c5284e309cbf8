"""Pretraining (``medseg pretrain``): a masked autoencoder on a folder of scans whose encoder starts a
segmentation U-Net through ``model.init_from``; bad inputs; resume after a kill."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from monai.networks.nets import DynUNet, UNet
from safetensors.torch import load_file

import medseg
from medseg.cli import main
from medseg.engine.transfer import initialise_from
from medseg.errors import ConfigError, DataVerificationError, ManifestError, ModelError
from medseg.tasks.pretraining.encoder import transferred_names
from medseg.tasks.pretraining.masking import MaskedReconstructionLoss, RandBlockMaskd
from medseg.tasks.registry import get_task, validate_config
from tests.conftest import (
    KILL_AT_SECOND_CHECKPOINT,
    REPO,
    make_case,
    tiny_config,
    train_run,
    write_msd_dataset,
)

#: The fine-tuning network of ``tiny_config`` (channels 4-8-16, two strides of 2), pretrained on 16x16x8 patches.
MODEL = ["model.channels=[4,8,16]", "model.num_res_units=1", "patch.size=[16,16,8]", "masking.block=[4,4,4]",
         "patch.samples_per_volume=2", "train.batch_size=2", "train.num_threads=1", "train.num_workers=0",
         "preprocess.spacing=[1.5,1.5,2.5]", "data.channels=[mri]"]


def scan_folder(folder: Path, shapes: tuple[tuple[int, int, int], ...] = ((23, 19, 11), (17, 29, 13), (21, 21, 9))) -> Path:
    """Unlabelled scans of odd shapes on oblique, anisotropic grids, in nested folders."""
    for i, shape in enumerate(shapes):
        image, _, affine = make_case(shape, seed=10 + i)
        path = folder / ("site_a" if i % 2 else "site_b") / f"scan_{i}.nii.gz"
        path.parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(image, affine), path)
    return folder


def settings(tmp_path: Path, *extra: str) -> list[str]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    return [*MODEL, f"output_dir={tmp_path / 'pretrain_runs'}", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
            "tracking.system_metrics=false", "train.max_epochs=2", *extra]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> medseg.PretrainResult:
    """One pretraining run of the folder, shared by the tests that read what it wrote."""
    home = tmp_path_factory.mktemp("pretrained")
    result = medseg.pretrain(scan_folder(home / "scans"), overrides=settings(home), progress=False)
    assert result is not None
    return result


def segmentation_config(tmp_path: Path, init_from: str | None = None) -> Path:
    dataset = write_msd_dataset(tmp_path / "labelled", n_cases=4)
    from medseg.data.build import build_manifest

    manifest = build_manifest(dataset, tmp_path / "labelled.csv", val_fraction=0.25, seed=1)
    model = {"name": "unet", "channels": [4, 8, 16], "num_res_units": 1, "init_from": init_from}
    return tiny_config(tmp_path, dataset, Path(manifest.path or tmp_path / "labelled.csv"),
                       f"sqlite:///{tmp_path / 'mlflow.db'}", model=model, train={"max_epochs": 1})


def test_pretrained_encoder_loads_into_the_segmentation_unet_by_init_from(tmp_path: Path, pretrained) -> None:
    seg_cfg = medseg.load_config(segmentation_config(tmp_path, str(pretrained.weights)))
    network = get_task("segmentation").build_network(seg_cfg)
    assert set(pretrained.tensors) == set(transferred_names(network, "encoder"))
    assert not any(name.startswith("model.2.") for name in pretrained.tensors)  # the head (outermost up) stays out
    report = initialise_from(network, str(pretrained.weights))
    assert report["loaded"] == sorted(pretrained.tensors)
    saved = load_file(str(pretrained.weights))
    own = network.state_dict()
    assert all(torch.equal(own[name], saved[name]) for name in pretrained.tensors)
    about = json.loads(pretrained.metadata.read_text())
    assert about["run_id"] == pretrained.run_id and about["transfer"] == "encoder"
    run = MlflowClient(pretrained.run.tracking_uri).get_run(pretrained.run_id)
    assert run.data.tags["medseg.kind"] == "pretraining" and run.data.tags["task"] == "pretraining"
    assert run.info.status == "FINISHED"


def test_the_fine_tuning_run_records_the_pretraining_run_and_the_tensors_it_loaded(tmp_path: Path, pretrained) -> None:
    result = train_run(segmentation_config(tmp_path, str(pretrained.weights)))
    tags = MlflowClient(result.tracking_uri).get_run(result.run_id).data.tags
    assert tags["medseg.pretraining_run_id"] == pretrained.run_id
    assert tags["medseg.init_from"] == str(pretrained.weights)
    record = json.loads((result.run_dir / "init_from.json").read_text())
    assert record["loaded"] == sorted(pretrained.tensors) and record["pretraining_run_id"] == pretrained.run_id
    assert "model.2.0.conv.weight" in record["fresh"]


def test_a_network_that_was_not_pretrained_is_refused_with_expected_got_file(tmp_path: Path, pretrained) -> None:
    wider = UNet(3, 1, 3, channels=(4, 8, 32), strides=(2, 2), num_res_units=1, norm="instance")
    with pytest.raises(ModelError, match=r"(?s)do not fit this network.*Expected: the network that was pretrained.*"
                                         r"channels.*Got:.*File: .*pretrained\.safetensors.*Fix:"):
        initialise_from(wider, str(pretrained.weights))


def test_a_manifest_works_and_its_labels_are_ignored(tmp_path: Path) -> None:
    dataset = write_msd_dataset(tmp_path / "labelled", n_cases=3, shape=(19, 23, 11))
    from medseg.data.build import build_manifest

    build_manifest(dataset, tmp_path / "cases.csv", val_fraction=0.34, seed=1)
    result = medseg.pretrain(tmp_path / "cases.csv", overrides=settings(tmp_path, f"data.root={dataset}",
                                                                        "train.max_epochs=1"), progress=False)
    assert result is not None
    cases = json.loads((result.run.run_dir / "summary.json").read_text())
    assert cases["metrics"]["train/epochs"] == 1
    log = (result.run.run_dir / "history.csv").read_text()
    assert "train/loss" in log


def test_an_empty_folder_and_an_unreadable_scan_fail_with_expected_got_file(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ManifestError, match=r"no scan under .*empty\. Expected: image files .*Got: an empty folder\. "
                                            r"File: "):
        medseg.pretrain(tmp_path / "empty", overrides=settings(tmp_path), progress=False)
    folder = scan_folder(tmp_path / "scans", shapes=((17, 19, 11),))
    (folder / "broken.nii.gz").write_bytes(b"not a scan at all" * 20)
    with pytest.raises(DataVerificationError) as raised:
        medseg.pretrain(folder, overrides=settings(tmp_path), progress=False)
    report = json.loads(Path(str(raised.value).split("Full report: ")[1].strip().split()[0]).read_text())
    text = json.dumps(report)
    assert "broken.nii.gz" in text and "not gzip-compressed" in text


def test_config_refuses_labels_unknown_keys_and_another_network() -> None:
    base = {"task": "pretraining", "data": {"manifest": "m.csv"}}
    with pytest.raises(ConfigError, match="data.labels does not apply to task: pretraining"):
        validate_config({**base, "data": {"manifest": "m.csv", "labels": {0: "bg", 1: "fg"}}})
    with pytest.raises(ConfigError, match="masking"):
        validate_config({**base, "masking": {"ratoi": 0.5}})
    with pytest.raises(ConfigError, match=r"model.name 'swin_unetr' cannot be pretrained yet\. Expected: a "
                                          r"segmentation U-Net \(unet, dynunet\) or a classification network"):
        validate_config({**base, "model": {"name": "swin_unetr"}})
    with pytest.raises(ConfigError, match="model.init_from does not apply to task: pretraining"):
        validate_config({**base, "model": {"name": "resnet18", "init_from": "w.safetensors"}})
    with pytest.raises(ConfigError, match="larger than patch.size"):
        validate_config({**base, "patch": {"size": [8, 8, 8]}, "masking": {"block": [16, 4, 4]}})


def test_block_masking_hides_its_ratio_and_the_loss_sees_only_masked_voxels() -> None:
    mask = RandBlockMaskd(block=(4, 4, 2), ratio=0.5)
    mask.set_random_state(seed=3)
    image = torch.randn(1, 13, 9, 6)  # odd sizes: edge cells are cut
    out = mask({"image": image})
    hidden = out["label"][1]
    assert out["label"].shape == (2, 13, 9, 6) and torch.equal(out["label"][:1], image)
    assert torch.all(out["image"][0][hidden > 0] == 0) and torch.equal(out["image"][0][hidden == 0], image[0][hidden == 0])
    cells = mask._cells
    assert cells is not None and cells.sum() == round(0.5 * cells.size)
    loss = MaskedReconstructionLoss("l1")
    perfect_where_hidden = torch.where(hidden > 0, image[0], image[0] + 5.0)[None, None]
    assert float(loss(perfect_where_hidden, out["label"][None])) == 0.0
    assert float(MaskedReconstructionLoss("l2")(torch.zeros(1, 1, 13, 9, 6), out["label"][None])) > 0


def test_transfer_all_is_every_tensor_but_the_head_of_unet_and_dynunet() -> None:
    unet = UNet(3, 1, 3, channels=(4, 8, 16), strides=(2, 2), num_res_units=1)
    everything = set(unet.state_dict())
    assert set(transferred_names(unet, "all")) == {n for n in everything if not n.startswith("model.2.")}
    dyn = DynUNet(3, 1, 2, kernel_size=[[3] * 3] * 3, strides=[[1] * 3, [2] * 3, [2] * 3],
                  upsample_kernel_size=[[2] * 3] * 2, filters=[4, 8, 16], norm_name="instance")
    encoder = set(transferred_names(dyn, "encoder"))
    assert {n for n in dyn.state_dict() if n.startswith(("input_block.", "downsamples.", "bottleneck."))} <= encoder
    assert not any("upsample" in n or n.startswith("output_block.") for n in encoder)
    assert "skip_layers.downsample.conv1.conv.weight" in encoder  # the same block under its other name


def test_cli_pretrains_a_folder_within_a_budget(tmp_path: Path, capsys) -> None:
    args = [f"--set={item}" for item in settings(tmp_path)]
    code = main(["pretrain", str(scan_folder(tmp_path / "scans")), *args, "--budget", "0.1m", "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0, out
    weights = Path(out.split("weights: ")[1].split()[0])
    assert weights.is_file() and weights.with_suffix(".json").is_file()
    assert "model.init_from=" in out


@pytest.mark.slow
def test_pretraining_killed_after_a_checkpoint_resumes_to_the_uninterrupted_weights(tmp_path: Path) -> None:
    """SIGKILL at the atomic write after the first mid-epoch checkpoint, then ``--resume``: the same
    weights as a run that was never stopped (deterministic, every step checkpointed)."""
    folder = scan_folder(tmp_path / "scans")
    common = ["train.deterministic=true", "train.checkpoint_interval_minutes=0", "train.iterations_per_epoch=2"]
    reference = medseg.pretrain(folder, overrides=settings(tmp_path / "ref", *common), progress=False)
    assert reference is not None
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MLFLOW_ENABLE_ASYNC_LOGGING": "false"}
    env.pop("MEDSEG_ALLOCATOR", None)
    args = ["pretrain", str(folder), *[f"--set={s}" for s in settings(tmp_path / "killed", *common)], "--no-progress"]
    killed = subprocess.run([sys.executable, "-c", KILL_AT_SECOND_CHECKPOINT, *args], env=env, capture_output=True, text=True, timeout=240)
    assert killed.returncode == -9, killed.stderr[-2000:]
    run_dirs = list((tmp_path / "killed" / "pretrain_runs").glob("2*"))
    assert len(run_dirs) == 1 and not (run_dirs[0] / "summary.json").exists()
    resumed = medseg.pretrain(folder, overrides=settings(tmp_path / "killed", *common), resume=True, progress=False)
    assert resumed is not None and resumed.run.run_dir == run_dirs[0]
    want, got = load_file(str(reference.weights)), load_file(str(resumed.weights))
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert np.isclose(resumed.run.metrics["train/loss"], reference.run.metrics["train/loss"])
