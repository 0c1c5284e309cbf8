"""Box files: world corners, LUNA16 centres and voxel corners, in RAS or LPS, onto a resampled
grid; and the messages for empty files, unknown columns, degenerate and outside boxes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from medseg.errors import ManifestError
from medseg.tasks.detection.box_files import boxes_on_grid, read_box_file

STORED = np.array([[0.8, 0, 0, -40.0], [0, 1.2, 0, 10.0], [0, 0, 3.0, 100.0], [0, 0, 0, 1]])
#: the stored grid resampled to 1.6 x 1.2 x 1.5 mm: what preprocessing gives
GRID = np.array([[1.6, 0, 0, -39.6], [0, 1.2, 0, 10.0], [0, 0, 1.5, 99.25], [0, 0, 0, 1]])


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_world_corners_in_ras_land_on_the_resampled_grid(tmp_path: Path) -> None:
    # voxels 4..7 x 2..5 x 2..6 of GRID: x from -39.6 + 1.6 * 3.5 = -34 to -39.6 + 1.6 * 7.5 = -27.6,
    # y 10 + 1.2 * 1.5 = 11.8 .. 10 + 1.2 * 5.5 = 16.6, z 99.25 + 1.5 * 1.5 = 101.5 .. 99.25 + 1.5 * 6.5 = 109
    path = _write(tmp_path / "boxes.csv", "case_id,class,x_min_mm,y_min_mm,z_min_mm,x_max_mm,y_max_mm,z_max_mm\n"
                  "a,2,-34,11.8,101.5,-27.6,16.6,109\n")
    boxes = boxes_on_grid(read_box_file(path, 3)["a"], GRID, STORED, (20, 16, 12), "ras", "boxes.csv (a)")
    np.testing.assert_allclose(boxes.corners, [[4, 2, 2, 8, 6, 7]])
    np.testing.assert_array_equal(boxes.classes, [2])


def test_luna_centres_in_lps_and_voxel_corners_agree(tmp_path: Path) -> None:
    # voxel corners of the stored file come back unchanged on its own grid
    voxel = _write(tmp_path / "v.json", json.dumps({"boxes": [{"case_id": "a", "start_0": 2, "start_1": 1,
                                                               "start_2": 1, "end_0": 5, "end_1": 4, "end_2": 3}]}))
    from_voxels = boxes_on_grid(read_box_file(voxel, 3)["a"], STORED, STORED, (20, 16, 12), "ras", "v")
    np.testing.assert_allclose(from_voxels.corners, [[2, 1, 1, 5, 4, 3]])
    # centre (RAS) -37.6, 12.4, 104.5 with a 2.4 mm edge (LPS: x, y change sign): x -38.8 .. -36.4 is
    # voxel (1.2 / 0.8 + 0.5 = 2) .. (3.6 / 0.8 + 0.5 = 5); y 11.2 .. 13.6 is 1.5 .. 3.5; z 103.3 .. 105.7 is 1.6 .. 2.4
    luna = _write(tmp_path / "annotations.csv", "seriesuid,coordX,coordY,coordZ,diameter_mm\na,37.6,-12.4,104.5,2.4\n")
    cube = boxes_on_grid(read_box_file(luna, 3)["a"], STORED, STORED, (20, 16, 12), "lps", "annotations.csv (a)")
    np.testing.assert_allclose(cube.corners, [[2, 1.5, 1.6, 5, 3.5, 2.4]], atol=1e-9)


def test_a_case_without_rows_has_no_boxes(tmp_path: Path) -> None:
    assert len(boxes_on_grid([], GRID, STORED, (20, 16, 12), "ras", "x")) == 0


@pytest.mark.parametrize(("text", "message"), [
    ("case_id,x_min_mm,y_min_mm,z_min_mm,x_max_mm,y_max_mm,z_max_mm\n", r"Got none \(an empty box file\)"),
    ("case_id,x,y,z\na,1,2,3\n", r"Expected 3D box columns, one of: world: x_min_mm.*Got \['case_id', 'x', 'y', 'z'\]"),
    ("case_id,start_0,start_1,start_2,end_0,end_1,end_2\na,1,2,three,3,4,5\n",
     r"boxes.csv:2: Expected a number in start_2. Got 'three'"),
    ("case_id,class,start_0,start_1,start_2,end_0,end_1,end_2\na,0,1,2,3,3,4,5\n", r"Expected a class of 1 or more"),
    ("case_id,start_0,start_1,start_2,end_0,end_1,end_2\n,1,2,3,3,4,5\n", r"Expected the case in a case_id"),
])
def test_bad_box_files_say_expected_and_got(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ManifestError, match=message):
        read_box_file(_write(tmp_path / "boxes.csv", text), 3)


def test_degenerate_and_outside_boxes_name_the_line(tmp_path: Path) -> None:
    path = _write(tmp_path / "boxes.csv", "case_id,start_0,start_1,start_2,end_0,end_1,end_2\n"
                  "a,4,2,2,4,5,5\nb,40,2,2,44,5,5\n")
    table = read_box_file(path, 3)
    with pytest.raises(ManifestError, match=r"boxes.csv:2: the box: Expected a box with positive size.*axis 0"):
        boxes_on_grid(table["a"], STORED, STORED, (20, 16, 12), "ras", "boxes.csv (a)")
    with pytest.raises(ManifestError, match=r"boxes.csv \(b\): box 0: Expected a box inside the image"):
        boxes_on_grid(table["b"], STORED, STORED, (20, 16, 12), "ras", "boxes.csv (b)")


def test_missing_and_unparseable_files(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="box file not found"):
        read_box_file(tmp_path / "none.csv", 3)
    with pytest.raises(ManifestError, match="Expected JSON"):
        read_box_file(_write(tmp_path / "b.json", "{"), 3)
    with pytest.raises(ManifestError, match="Expected a list of box objects"):
        read_box_file(_write(tmp_path / "c.json", '{"boxes": 3}'), 3)
