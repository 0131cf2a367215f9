"""Screenshots of TensorBoard as a user sees it after a sweep: the HPARAMS table and the metric-vs-percentile
charts (SCALARS tab), rendered by headless Chromium from a ``tensorboard`` server on the loopback.

By default it runs ``main.py test`` on ``configs/cifar10_resnet20_ash_s.yaml`` with ASH-S and SCALE at
65/75/85/90/95 and the unshaped baseline (energy score), each set limited to ``--limit`` random images, and writes
``docs/tensorboard_hparams.png`` and ``docs/tensorboard_vs_percentile.png``; ``--logdir`` shoots an existing log
folder instead. Skipped (exit 0, with a message) when no ``chromium`` command is installed (Debian: ``apt-get
install chromium``).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

from _common import CIFAR10_CONFIG, ID_FILE, OOD_FILES, REPO, checkpoint_file, datasets_dir

CONFIG = CIFAR10_CONFIG
GRID = ["none", *(f"{method}@{p}" for method in ("ash_s", "scale") for p in (65, 75, 85, 90, 95))]
VIEWS = {  # file name -> (URL fragment, window size, zoom)
    "tensorboard_hparams.png": ("#hparams", (2600, 900), 0.6),
    "tensorboard_vs_percentile.png": (
        "#scalars&_smoothingWeight=0&regexInput=%2Fsweep%2F&tagFilter=vs_percentile%2Fmean%2F(fpr95%7Cauroc)%24",
        (1400, 470),
        1.0,
    ),
}


def sweep_logdir(limit: int, out: Path) -> Path:
    """Run the sweep through ``main.py test`` in this process; its log folder."""
    from ash_lightning.cli.app import main as cli_main

    datasets_dir([ID_FILE, *OOD_FILES.values(), checkpoint_file("cifar_resnet20")])
    config = yaml.safe_load(CONFIG.read_text())
    config["model"]["shaping"] = GRID
    data = config["data"]
    data["id"] = {**data["id"], "limit": limit}
    data["ood"] = {name: {**spec, "limit": limit} for name, spec in data["ood"].items()}
    config["trainer"]["logger"]["init_args"].update(save_dir=str(out / "logs"), name="cifar10_sweep", version="v")
    path = out / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        if cli_main(["test", "--config", str(path)]) != 0:
            sys.exit(f"error: the sweep failed:\n{err.getvalue()[-2000:]}")
    return out / "logs"


def shoot(logdir: Path, out_dir: Path, browser: str) -> list[Path]:
    """Start tensorboard on ``logdir`` (loopback, a free port), screenshot every view into ``out_dir``, stop it."""
    tensorboard = Path(sys.executable).with_name("tensorboard")
    command = [str(tensorboard), "--logdir", logdir.name, "--host", "127.0.0.1", "--port", "0", "--load_fast=false"]
    server = subprocess.Popen(  # the folder by its name: the screenshot shows no machine path
        command, cwd=logdir.resolve().parent, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    written = []
    try:
        assert server.stderr is not None
        port, deadline = None, time.monotonic() + 60
        while port is None and time.monotonic() < deadline and server.poll() is None:
            if found := re.search(r"http://127\.0\.0\.1:(\d+)/", server.stderr.readline()):
                port = int(found.group(1))
        if port is None:
            sys.exit("error: tensorboard did not start within 60 s")
        while b"/sweep/" not in urllib.request.urlopen(f"http://127.0.0.1:{port}/data/runs", timeout=10).read():
            if time.monotonic() > deadline:
                sys.exit("error: tensorboard did not load the sweep within 60 s")
            time.sleep(0.5)
        time.sleep(2)
        for name, (fragment, (width, height), zoom) in VIEWS.items():
            target = out_dir / name
            subprocess.run(
                [
                    browser,
                    "--headless",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--hide-scrollbars",
                    f"--window-size={width},{height}",
                    f"--force-device-scale-factor={zoom}",
                    "--virtual-time-budget=20000",
                    f"--screenshot={target}",
                    f"http://127.0.0.1:{port}/{fragment}",
                ],
                check=True,
                capture_output=True,
                timeout=120,
            )
            written.append(target)
    finally:
        server.kill()
        server.wait(10)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logdir", type=Path, help="shoot this log folder instead of running the sweep")
    parser.add_argument("--limit", type=int, default=1000, help="images per data set of the sweep (default 1000)")
    parser.add_argument("--out", type=Path, default=REPO / "docs", help="where the PNGs go (default docs/)")
    args = parser.parse_args()
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        print("skipped: no chromium command (Debian: apt-get install chromium)")
        return
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        logdir = args.logdir or sweep_logdir(args.limit, Path(scratch))
        for path in shoot(logdir, args.out, browser):
            print(f"{path.relative_to(REPO) if path.is_relative_to(REPO) else path}: {path.stat().st_size} bytes")


if __name__ == "__main__":
    main()
