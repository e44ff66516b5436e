"""``mls plot``: one panel per logged quantity from a hand-written CSVLogger file."""
import os
import time

import numpy as np
import pytest
from PIL import Image

from mls.cli import main
from mls.viz.curves import DPI, PANEL_INCHES, find_metrics, read_metrics

# As Lightning's CSVLogger writes it: one row per logging call, empty cells for the rest.
METRICS = """\
epoch,step,train/images_per_sec,train/label_precision,train/loss,train/loss_extra,train/loss_infonce,train/lr,train/pos_sim,train/queue_fill
0,9,120.5,0.20,7.5,0.70,6.8,0.03,0.41,0.5
0,19,130.0,0.25,7.3,0.69,6.6,0.029,0.45,1.0
1,29,,,7.1,0.68,6.4,,0.50,1.0
1,29,,,,,,0.028,,
"""


def drawn_panels(png, cols, rows):
    """Count panels whose area holds dark (axis, line, text) pixels, from the PNG alone."""
    img = np.asarray(Image.open(png).convert("L"))
    h, w = img.shape
    count = 0
    for r in range(rows):
        for c in range(cols):
            cell = img[r * h // rows:(r + 1) * h // rows, c * w // cols:(c + 1) * w // cols]
            count += int((cell < 100).any())
    return count


def test_plot_makes_one_panel_per_logged_quantity(tmp_path):
    (tmp_path / "metrics.csv").write_text(METRICS)
    main(["plot", str(tmp_path / "metrics.csv"), "--out", str(tmp_path / "curves.png")])
    # 8 quantities in 3 columns: a 3 x 3 grid whose last cell stays empty.
    png = tmp_path / "curves.png"
    w, h = Image.open(png).size
    assert (w, h) == (3 * PANEL_INCHES[0] * DPI, 3 * PANEL_INCHES[1] * DPI)
    assert drawn_panels(png, cols=3, rows=3) == 8


def test_absent_columns_are_skipped(tmp_path):
    (tmp_path / "metrics.csv").write_text("epoch,step,train/loss,train/lr\n0,1,5.0,\n0,1,,0.1\n0,2,4.0,\n")
    main(["plot", str(tmp_path / "metrics.csv"), "--out", str(tmp_path / "c.png")])
    w, h = Image.open(tmp_path / "c.png").size
    assert (w, h) == (2 * PANEL_INCHES[0] * DPI, PANEL_INCHES[1] * DPI)
    assert drawn_panels(tmp_path / "c.png", cols=2, rows=1) == 2


def test_series_skip_empty_cells_and_use_the_step(tmp_path):
    (tmp_path / "metrics.csv").write_text(METRICS)
    series = read_metrics(tmp_path / "metrics.csv")
    assert series["train/lr"] == [(9.0, 0.03), (19.0, 0.029), (29.0, 0.028)]
    assert series["train/loss"] == [(9.0, 7.5), (19.0, 7.3), (29.0, 7.1)]
    assert "epoch" not in series and "step" not in series


def test_a_log_folder_joins_the_versions_of_a_resumed_run(tmp_path):
    """version_0 ran steps 9-29; resumed after step 19, version_1 re-logged 29 and went on to 39."""
    resumed = "epoch,step,train/loss\n1,29,6.9\n1,39,6.5\n"
    for n, text in ((0, METRICS), (1, resumed)):
        d = tmp_path / "csv" / f"version_{n}"
        d.mkdir(parents=True)
        (d / "metrics.csv").write_text(text)
        os.utime(d / "metrics.csv", (time.time() - 100 + 50 * n,) * 2)
    files = find_metrics(tmp_path)
    assert files == [tmp_path / "csv" / "version_0" / "metrics.csv", tmp_path / "csv" / "version_1" / "metrics.csv"]
    assert read_metrics(*files)["train/loss"] == [(9.0, 7.5), (19.0, 7.3), (29.0, 6.9), (39.0, 6.5)]


def test_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no metrics.csv under"):
        find_metrics(tmp_path)
    (tmp_path / "metrics.csv").write_text("epoch,step\n0,1\n")
    with pytest.raises(ValueError, match="no metric columns"):
        main(["plot", str(tmp_path), "--out", str(tmp_path / "c.png")])
    with pytest.raises(ValueError, match="does not exist"):
        main(["plot", str(tmp_path), "--out", str(tmp_path / "missing" / "c.png")])


def test_health_groups_share_a_panel(tmp_path):
    """The forces on z1, the logits of positives and negatives, and the two ranks are each read in one panel."""
    (tmp_path / "metrics.csv").write_text(
        "epoch,step,health/rank_z,health/rank_g,health/grad_infonce,health/grad_extra_pos,health/grad_extra_neg,"
        "health/logit_pos,health/logit_neg,health/mean_norm,train/loss\n"
        "0,9,40,90,2.0,0.1,1.5,4.0,3.5,0.9,6.0\n0,19,30,80,2.1,0.1,1.2,3.0,2.0,0.8,5.5\n")
    main(["plot", str(tmp_path / "metrics.csv"), "--out", str(tmp_path / "c.png")])
    # 9 columns in 5 panels (loss, mean norm, ranks, forces, logits): 3 x 2, the last cell empty
    assert Image.open(tmp_path / "c.png").size == (3 * PANEL_INCHES[0] * DPI, 2 * PANEL_INCHES[1] * DPI)
    assert drawn_panels(tmp_path / "c.png", cols=3, rows=2) == 5
