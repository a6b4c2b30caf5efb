"""Screenshots of what a user sees, taken with headless Chromium: the MLflow UI and the `dvc plots show` page.

Run from the project root after a pipeline run (``make demo``, or ``dvc repro``):

    python docs/screenshots.py mlflow   # mlflow ui on 127.0.0.1: the experiment's runs, the compare view of the
                                        # latest training runs, the registered model and its latest version
                                        # -> artifacts/screenshots/mlflow-*.png
    python docs/screenshots.py plots    # dvc plots show, opened with every network request refused
                                        # -> artifacts/screenshots/dvc-plots.png; fails unless the plots render
    python docs/screenshots.py tensorboard  # tensorboard on 127.0.0.1 over logs/tensorboard (runs with
                                        # `tracking: [..., tensorboard]`) -> artifacts/screenshots/tensorboard.png

``--out FOLDER`` writes elsewhere (the README's picture: ``--out docs/images``). Needs ``chromium`` (Debian:
``apt-get install chromium``) or ``CHROMIUM=/path/to/chrome``. Nothing listens beyond 127.0.0.1, and the
server started here is stopped at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path.cwd()
# refuse every name lookup and proxy every request to a closed port: a page that needs the network stays blank
OFFLINE_FLAGS = ["--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1", "--proxy-server=127.0.0.1:9",
                 "--proxy-bypass-list=<-loopback>"]


def chromium() -> str:
    found = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser") \
        or shutil.which("google-chrome")
    if not found:
        sys.exit("no chromium found: apt-get install chromium, or set CHROMIUM")
    return found


def browse(url: str, *, screenshot: Path | None = None, size: str = "1600,1000", wait_ms: int = 15000,
           offline: bool = False) -> str:
    """Open ``url`` in headless Chromium, let its scripts run for ``wait_ms`` of virtual time, and return the
    page's DOM; with ``screenshot``, write a PNG of the window instead (and return "")."""
    with tempfile.TemporaryDirectory(prefix="llm-chromium-") as profile:
        command = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                   f"--user-data-dir={profile}", f"--window-size={size}", f"--virtual-time-budget={wait_ms}",
                   *(OFFLINE_FLAGS if offline else [])]
        if screenshot is not None:
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            command.append(f"--screenshot={screenshot}")
        else:
            command.append("--dump-dom")
        out = subprocess.run([*command, url], capture_output=True, text=True, timeout=180)
    if out.returncode != 0:
        sys.exit(f"chromium failed on {url}: {out.stderr.strip()[-500:]}")
    return out.stdout


def plots(out: Path) -> None:
    page = ROOT / "dvc_plots" / "index.html"
    subprocess.run(["dvc", "plots", "show", "-o", str(page.parent)], check=True, cwd=ROOT)
    html = page.read_text(encoding="utf-8")
    remote = re.findall(r"<(?:script|link)\b[^>]*(?:src|href)\s*=\s*[\"']?(https?:[^\"' >]+)", html)
    if remote:
        sys.exit(f"{page} loads {remote}: is .dvc/config's plots.html_template the offline one?")
    dom = browse(page.as_uri(), offline=True, wait_ms=5000)
    charts = dom.count('class="marks"')
    if not charts:
        sys.exit(f"{page}: no chart rendered with the network off")
    browse(page.as_uri(), screenshot=out / "dvc-plots.png", size="1400,800", offline=True, wait_ms=5000)
    print(f"{charts} charts rendered offline: {out / 'dvc-plots.png'}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mlflow(out: Path) -> None:
    from mlflow import MlflowClient

    from llm.mlops.runs import ui_url
    from llm.mlops.tracking import experiment_name, tracking_uri

    uri = tracking_uri()
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(experiment_name())
    if experiment is None:
        sys.exit(f"no experiment {experiment_name()} in {uri}: run the pipeline first")
    runs = [r for r in client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"],
                                          max_results=200) if r.data.tags.get("stage") in ("pretrain", "finetune")][:4]
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host",
                               "127.0.0.1", "--port", str(port)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"{base}/health", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        else:
            sys.exit("mlflow ui did not answer in 60 s")
        browse(ui_url(experiment.experiment_id, base), screenshot=out / "mlflow-experiment.png")
        ids = json.dumps([r.info.run_id for r in reversed(runs)])
        query = urllib.parse.urlencode({"runs": ids, "experiments": json.dumps([experiment.experiment_id]),
                                        "workflowType": "machine_learning"})
        browse(f"{base}/#/compare-runs?{query}", screenshot=out / "mlflow-compare.png", size="1600,1300")
        browse(f"{base}/#/models/gpt?workflowType=machine_learning", screenshot=out / "mlflow-model.png")
        latest = max((int(v.version) for v in client.search_model_versions("name='gpt'")), default=None)
        if latest is not None:
            browse(f"{base}/#/models/gpt/versions/{latest}?workflowType=machine_learning",
                   screenshot=out / "mlflow-version.png", size="1600,1100")
    finally:  # the server and its workers: the process group started above
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
    print(f"screenshots of {uri} ({len(runs)} training runs compared) in {out}")


def _stop(server: subprocess.Popen) -> None:
    """Stop ``server`` and what it started: the process group it leads."""
    os.killpg(server.pid, signal.SIGTERM)
    try:
        server.wait(10)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)


def tensorboard(out: Path) -> None:
    logdir = ROOT / "logs" / "tensorboard"
    runs = sorted(p.name for p in logdir.glob("*") if any(p.glob("events.out.tfevents.*"))) if logdir.is_dir() else []
    if not runs:
        sys.exit(f"no TensorBoard run in {logdir}: run a stage with --set 'tracking=[mlflow,tensorboard]' first")
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", "logs/tensorboard", "--host",
                               "127.0.0.1", "--port", str(port)], cwd=ROOT, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)  # the README's command
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                listed = json.loads(urllib.request.urlopen(f"{base}/data/runs", timeout=2).read())
                if set(runs) <= set(listed):  # every run loaded
                    break
            except (OSError, ValueError):
                pass
            time.sleep(0.5)
        else:
            sys.exit("tensorboard did not list the runs in 60 s")
        # the scalars dashboard on the losses, unsmoothed (TensorBoard serves all it needs itself; OFFLINE_FLAGS
        # would send 127.0.0.1 to the closed proxy too)
        (out / "tensorboard.png").unlink(missing_ok=True)
        browse(f"{base}/?darkMode=false#scalars&tagFilter=loss&_smoothingWeight=0", screenshot=out / "tensorboard.png",
               size="1600,1000")
    finally:
        _stop(server)
    if not (out / "tensorboard.png").is_file():
        sys.exit(f"chromium wrote no {out / 'tensorboard.png'}")
    print(f"screenshot of {len(runs)} TensorBoard runs in {out / 'tensorboard.png'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["mlflow", "plots", "tensorboard"])
    parser.add_argument("--out", type=Path, default=ROOT / "artifacts" / "screenshots")
    args = parser.parse_args()
    {"mlflow": mlflow, "plots": plots, "tensorboard": tensorboard}[args.what](args.out)


if __name__ == "__main__":
    main()
