"""TensorBoard as a user meets it: `tensorboard --logdir runs` over trained runs (one of them killed
and resumed), its HTTP data, and the page in headless Chromium (a screenshot of the curves and of
the validation image, and the text the page rendered).

The HTTP checks need only TensorBoard (a dependency). The browser part skips without Chromium,
saying so, unless ``DIFFSEG_CHROMIUM_REQUIRED=1`` (CI installs it). ``DIFFSEG_SCREENSHOTS=DIR``
keeps the screenshots there, to look at.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest
from test_provenance import base_run, run_cfg  # noqa: F401 (base_run is a fixture)
from test_train import toy_data  # noqa: F401 (a fixture)

pytestmark = pytest.mark.slow
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> object:
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def runs(base_run, toy_data, tmp_path_factory):  # noqa: F811
    """``runs/toy/{3d-diff, 3d-diff-resumed, 3d-seg}``: the second killed after logging step 6
    but before checkpoint 6 (as a SIGKILL leaves it), then resumed from checkpoint 3."""
    from diffseg.train import train_run

    root = tmp_path_factory.mktemp("tb") / "runs"
    shutil.copytree(base_run, root / "toy" / "3d-diff")
    resumed = Path(shutil.copytree(base_run, root / "toy" / "3d-diff-resumed"))
    shutil.rmtree(resumed / "checkpoints" / "6")
    train_run(run_cfg(), toy_data, resumed)
    train_run(run_cfg("3d-seg"), toy_data, root / "toy" / "3d-seg")
    return root


@pytest.fixture(scope="module")
def board(runs):
    """A TensorBoard server on 127.0.0.1 over ``runs``; yields its URL."""
    port = _free_port()
    tensorboard = Path(sys.executable).with_name("tensorboard")
    cmd = [str(tensorboard), "--logdir", str(runs), "--host", "127.0.0.1", "--port", str(port)]
    log = (runs.parent / "tensorboard.log").open("w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                if len(_get(f"{url}/data/runs")) == 3:
                    break
            except OSError:
                pass
            if time.time() > deadline or proc.poll() is not None:
                said = (runs.parent / "tensorboard.log").read_text()
                raise AssertionError(f"TensorBoard did not list the 3 runs: {said}")
            time.sleep(1)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def test_tensorboard_serves_every_run_with_one_curve_each(board):
    assert sorted(_get(f"{board}/data/runs")) == ["toy/3d-diff", "toy/3d-diff-resumed", "toy/3d-seg"]
    scalars = _get(f"{board}/data/plugin/scalars/tags")
    for run in scalars:
        assert {"train/loss", "train/lr", "train/steps_per_s", "valid/mean_dice"} <= set(scalars[run])
        assert {"valid/dice/1_box", "valid/dice/2_ball"} <= set(scalars[run])
    images = _get(f"{board}/data/plugin/images/tags")
    assert all("valid/mid_slice" in images[run] for run in scalars)
    for run in ("toy/3d-diff", "toy/3d-diff-resumed"):
        points = _get(f"{board}/data/plugin/scalars/scalars?run={quote(run)}&tag=train/loss")
        assert [p[1] for p in points] == [1, 2, 3, 4, 5, 6], run  # [wall time, step, value] rows
    resumed = _get(f"{board}/data/plugin/scalars/scalars?run={quote('toy/3d-diff-resumed')}&tag=train/loss")
    whole = _get(f"{board}/data/plugin/scalars/scalars?run={quote('toy/3d-diff')}&tag=train/loss")
    np.testing.assert_allclose([p[2] for p in resumed], [p[2] for p in whole], rtol=1e-5)  # resumed exactly


def _served_pictures(board: str, run: str) -> dict[int, np.ndarray]:
    """``{step: (H, W, 3) uint8}`` of the run's ``valid/mid_slice`` as TensorBoard serves them."""
    import io

    from PIL import Image

    listed = _get(f"{board}/data/plugin/images/images?run={quote(run)}&tag=valid/mid_slice&sample=0")
    out = {}
    for entry in listed:
        with urllib.request.urlopen(f"{board}/data/plugin/images/individualImage?{entry['query']}") as r:
            out[entry["step"]] = np.asarray(Image.open(io.BytesIO(r.read())).convert("RGB"))
    return out


def test_tensorboard_serves_the_validation_pictures(board, toy_data):  # noqa: F811
    from diffseg.data import load_dataset
    from diffseg.train.tensorboard import mid_slice_panel

    whole, resumed = (_served_pictures(board, f"toy/{r}") for r in ("3d-diff", "3d-diff-resumed"))
    assert sorted(whole) == sorted(resumed) == [3, 6]
    image, label = (a[0] for a in load_dataset(toy_data).split("valid")[1:])
    assert whole[6].shape == mid_slice_panel(image, label, label, 3).shape
    gray = whole[6][:, : whole[6].shape[1] // 3 - 4]  # the left panel: the image, no class colour
    assert (gray.max(axis=-1) == gray.min(axis=-1)).all()
    np.testing.assert_array_equal(resumed[6], whole[6])  # resumed exactly: the same prediction


def _browser() -> str | None:
    return next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)


def _chromium(browser: str, url: str, out: Path, *what: str) -> str:
    """Load ``url`` headless for a (virtual) 20 s; ``what``: ``--screenshot=...`` or ``--dump-dom``."""
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
           "--window-size=1400,1100", "--virtual-time-budget=20000", *what, url]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=out)
    return done.stdout


def test_the_page_in_headless_chromium_shows_the_curves_and_the_validation_image(board, tmp_path):
    browser = _browser()
    if browser is None:
        if os.environ.get("DIFFSEG_CHROMIUM_REQUIRED") == "1":
            pytest.fail("DIFFSEG_CHROMIUM_REQUIRED=1 but no Chromium found (apt-get install chromium)")
        pytest.skip("no Chromium here (apt-get install chromium); the HTTP checks above still ran")
    from PIL import Image

    # The page as rendered (the image dashboard draws inside shadow DOM, which a dump leaves out:
    # the picture is checked through TensorBoard's HTTP data above and seen in the screenshot).
    curves_dom = _chromium(browser, f"{board}/#timeseries", tmp_path, "--dump-dom")
    for text in ("toy/3d-diff", "toy/3d-diff-resumed", "toy/3d-seg", "train/loss", "train/steps_per_s"):
        assert text in curves_dom, text

    shots = {}
    for name, page in (("curves", "#timeseries"), ("images", "#images")):
        path = tmp_path / f"tensorboard_{name}.png"
        _chromium(browser, f"{board}/{page}", tmp_path, f"--screenshot={path}")
        pixels = np.asarray(Image.open(path).convert("RGB"))
        assert pixels.shape[:2] == (1100, 1400)
        colours = np.unique(pixels.reshape(-1, 3), axis=0)
        assert len(colours) > 50, f"{name}: a near-blank page ({len(colours)} colours)"
        shots[name] = path
    keep = os.environ.get("DIFFSEG_SCREENSHOTS")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        for path in shots.values():
            shutil.copy(path, keep)
