"""Trust, third round (issue #35): weights files, models too big for memory, `transfer runs` on hostile folders,
serve's aspect bound, int8 refusals before work, and nothing sent or written outside the outputs (onnxruntime's
telemetry off: HOME stays empty, and strace sees no DNS lookup and no connection outside loopback)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

import cli
from tests.conftest import digits_folder, one_line_error
from transfer.training import FinetuneConfig, finetune

ROOT = Path(__file__).resolve().parents[1]
TRANSFER = str(Path(sys.executable).parent / "transfer")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[Path, Path]:
    """A lenet5 run on 4 classes of real digits (and the folder), made once for the module."""
    root = tmp_path_factory.mktemp("round3")
    data = digits_folder(root / "digits", per_class=12, size=32, classes=4)
    finetune(data, FinetuneConfig(backbone="lenet5", epochs_head=2, epochs_finetune=0, workers=0, batch_size=8,
                                  augment=False), output=root / "run", device="cpu", log=lambda _: None)
    return root / "run", data


def test_weights_files_that_are_not_weights_are_one_line(tmp_path, runner):
    text, empty, empty_st = tmp_path / "notes.pt", tmp_path / "empty.pt", tmp_path / "empty.safetensors"
    text.write_text("hello, these are not weights\n")
    empty.write_bytes(b"")
    empty_st.write_bytes(b"")
    out = tmp_path / "m.onnx"
    message = one_line_error(runner.invoke(cli.app, ["export", "-b", "lenet5", "--weights", str(text), "-o", str(out)]))
    assert message.startswith(f"error: cannot read weights file {text}: not a safetensors file or a torch state dict")
    for path in (empty, empty_st):
        message = one_line_error(runner.invoke(cli.app, ["export", "-b", "lenet5", "--weights", str(path), "-o",
                                                         str(out)]))
        assert message == (f"error: weights file {path} is empty (0 bytes); it needs a safetensors file or a saved "
                           "state dict")
    assert not out.exists()


def test_a_model_too_big_for_memory_is_refused_before_it_is_built(tmp_path, runner, monkeypatch):
    """vit_gigantic on a machine without the memory ended in a torch allocator traceback; the weights' size is
    counted on the meta device first (resnet18: 11.7M parameters, 44.6 MiB of float32)."""
    import models.weights

    monkeypatch.setattr(models.weights, "available_memory", lambda: 20 * 2**20)
    data = digits_folder(tmp_path / "digits", per_class=2, size=32, classes=2)
    result = runner.invoke(cli.app, ["finetune", str(data), "-b", "resnet18", "--no-pretrained", "-o",
                                     str(tmp_path / "run"), "--device", "cpu"])
    assert one_line_error(result) == ("error: resnet18 has 12M parameters: its float32 weights alone need 45 MiB, "
                                      "and 20 MiB of memory is available here; choose a smaller model or free memory")
    layers = runner.invoke(cli.app, ["layers", "-b", "resnet18"])
    assert "its float32 weights alone need 45 MiB" in one_line_error(layers)


def run_folder(root: Path, name: str, config: object, report: object | None = None) -> Path:
    run = root / name
    run.mkdir(parents=True)
    (run / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    if report is not None:
        (run / "report.json").write_text(report if isinstance(report, str) else json.dumps(report))
    return run


def test_runs_never_hangs_or_breaks_on_one_bad_run(tmp_path):
    """A FIFO named config.json or report.json blocked `transfer runs` forever; `"epochs": "abc"` or `"created": 5`
    broke the whole table; a damaged report.json showed as interrupted. Run in a process with a deadline."""
    root = tmp_path / "runs"
    good = {"backbone": "resnet18", "created": "2026-12-01T10:00:00", "stages": [{"name": "head", "epochs": 2}]}
    run_folder(root, "good", good, {"finished": True, "epochs": 2, "best_val_loss": 0.5, "accuracy": 0.9})
    os.mkfifo(run_folder(root, "fifo_report", good) / "report.json")
    fifo_config = root / "fifo_config"
    fifo_config.mkdir()
    os.mkfifo(fifo_config / "config.json")
    os.mkfifo(run_folder(root, "fifo_lock", good) / ".lock")
    run_folder(root, "text_epochs", {**good, "stages": [{"name": "head", "epochs": "abc"}]})
    run_folder(root, "number_created", {**good, "created": 5})
    run_folder(root, "report_epochs", good, {"finished": True, "epochs": "abc"})
    run_folder(root, "report_damaged", good, "{half a report")
    run_folder(root, "report_list", good, "[1, 2]")
    listing = subprocess.run([TRANSFER, "runs", str(root), "--json", str(tmp_path / "rows.json")],
                             capture_output=True, text=True, timeout=120)
    assert listing.returncode == 0 and "Traceback" not in listing.stderr, listing.stderr
    rows = {Path(row["run"]).name: row for row in json.loads((tmp_path / "rows.json").read_text())}
    assert rows["good"]["status"] == "finished" and rows["fifo_lock"]["status"] == "interrupted"
    expected = {"fifo_report": "report.json: not a regular file", "fifo_config": "config.json: not a regular file",
                "text_epochs": "config.json: stages: a list of stages with whole epoch counts expected",
                "number_created": "config.json: created: text expected, found 5",
                "report_epochs": "report.json: epochs must be a whole number and finished true or false",
                "report_damaged": "report.json: not valid JSON", "report_list": "report.json: not a JSON object"}
    for name, problem in expected.items():
        assert (rows[name]["status"], rows[name]["problem"]) == ("damaged", problem), rows[name]
    assert "9 run(s) under" in listing.stdout


def test_serve_refuses_an_aspect_bound_past_the_models_own(tmp_path, runner, tiny_run):
    """--max-aspect-ratio 100 let a 600x10 image past the header check, then the model's preprocessing refused it
    with a 500 and a traceback; the bound is checked at start now, and any refusal of the preprocessing is the
    image's own 413/422."""
    from PIL import Image

    from exporters.export import export_onnx

    model = export_onnx(tmp_path / "m.onnx", run=tiny_run[0]).path
    message = one_line_error(runner.invoke(cli.app, ["serve", "--onnx", model, "--max-aspect-ratio", "100"]))
    assert message.startswith("error: --max-aspect-ratio 100: must be 1..50 (the model's preprocessing refuses")
    from fastapi.testclient import TestClient

    from transfer.serving.limits import ServeLimits
    from transfer.serving.serve import create_app

    thin = tmp_path / "thin.png"
    Image.new("RGB", (600, 10), (200, 30, 30)).save(thin)
    with TestClient(create_app(model, device="cpu", limits=ServeLimits().check())) as client:
        answer = client.post("/predict", files=[("files", ("thin.png", thin.read_bytes()))])
    assert answer.status_code == 413 and "too thin to resize: 600x10" in answer.text


def test_int8_refusals_come_before_any_export_work(tmp_path, runner, tiny_run, monkeypatch):
    """A calibration folder of only bad files was refused after the fp32 export; it is refused first now."""
    import exporters.export

    def no_export(*args, **kwargs):
        raise AssertionError("the model was exported before the calibration folder was checked")

    monkeypatch.setattr(exporters.export, "export_graph", no_export)
    bad = tmp_path / "calibration" / "a"
    bad.mkdir(parents=True)
    for index in range(3):
        (bad / f"{index}.png").write_text("not an image\n")
    result = runner.invoke(cli.app, ["export", "--run", str(tiny_run[0]), "--int8", "--calibration",
                                     str(tmp_path / "calibration"), "-o", str(tmp_path / "m.onnx")])
    assert one_line_error(result) == (f"error: --calibration {tmp_path / 'calibration'}: no usable images (3 file(s) "
                                      f"skipped, first: {bad / '0.png'}: not an image (content not recognised))")


def connections(trace: Path) -> list[str]:
    """Every connect() or sendto() to a network address that is not loopback, and every DNS packet, in a strace."""
    outside = []
    for line in trace.read_text().splitlines():
        if "AF_INET" not in line:
            continue
        address = re.search(r'inet_(?:addr|pton)\((?:AF_INET6, )?"([^"]+)"', line)
        port = re.search(r"htons\((\d+)\)", line)
        if (address and address.group(1) not in ("127.0.0.1", "::1", "::ffff:127.0.0.1", "0.0.0.0")) or \
                (port and port.group(1) == "53"):
            outside.append(line)
    return outside


def test_importing_transfer_writes_nothing_under_home(tmp_path):
    """The quick check (the whole one, under strace, is below): onnxruntime, loaded through transfer, no longer
    writes its device id and event database under ~/.cache/Microsoft when the user's shell has no opt-out set."""
    home = tmp_path / "home"
    home.mkdir()
    env = {key: value for key, value in os.environ.items() if key not in
           ("ORT_DISABLE_TELEMETRY", "MLFLOW_DISABLE_TELEMETRY", "HF_HUB_DISABLE_TELEMETRY", "DO_NOT_TRACK")}
    code = ("import exporters.runtime, onnxruntime, os; "
            "print(os.environ['ORT_DISABLE_TELEMETRY'], os.environ['MLFLOW_DISABLE_TELEMETRY'])")
    done = subprocess.run([sys.executable, "-c", code], env={**env, "HOME": str(home)}, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.split() == ["1", "true"], done.stderr
    assert list(home.rglob("*")) == []
    mine = subprocess.run([sys.executable, "-c", "import transfer, os; print(os.environ['ORT_DISABLE_TELEMETRY'])"],
                          env={**env, "HOME": str(home), "ORT_DISABLE_TELEMETRY": "0"}, capture_output=True,
                          text=True, timeout=120)
    assert mine.stdout.strip() == "0"  # a value the user set is theirs


@pytest.mark.slow  # 50 s: four real processes under strace; the quick HOME check above is in the fast suite
def test_nothing_is_sent_or_written_outside_the_outputs(tmp_path, tiny_run):
    """`import onnxruntime` wrote ~/.cache/Microsoft/DeveloperTools/.onnxruntime/{deviceid,onnxruntime.db} and
    export looked up mobile.events.data.microsoft.com 12-18 times. With HOME an empty folder, export (fp32 and
    int8), predict and serve leave it empty, and no process they start looks a name up or connects off loopback."""
    assert shutil.which("strace"), "strace is missing: `make test` installs it (apt-get install strace)"
    run, data = tiny_run
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "HOME": str(home)}
    for name in ("ORT_DISABLE_TELEMETRY", "MLFLOW_DISABLE_TELEMETRY", "HF_HUB_DISABLE_TELEMETRY", "DO_NOT_TRACK"):
        env.pop(name, None)  # what a user's shell has: transfer itself must switch them off

    def traced(name: str, *args: str) -> subprocess.CompletedProcess:
        trace = tmp_path / f"{name}.strace"
        done = subprocess.run(["strace", "-f", "-qq", "-e", "trace=connect,sendto", "-o", str(trace), TRANSFER,
                               *args], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
        assert connections(trace) == [], name
        return done

    traced("export", "export", "--run", str(run), "-o", str(tmp_path / "m.onnx"))
    traced("int8", "export", "--run", str(run), "--int8", "--calibration", str(data), "-o", str(tmp_path / "q.onnx"))
    traced("predict", "predict", str(data / "0"), "--onnx", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "p.csv"))
    port = free_port()
    trace = tmp_path / "serve.strace"
    server = subprocess.Popen(["strace", "-f", "-qq", "-e", "trace=connect,sendto", "-o", str(trace), TRANSFER,
                               "serve", "--onnx", str(tmp_path / "m.onnx"), "--port", str(port), "--device", "cpu"],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline, answer = time.monotonic() + 120, None
        while time.monotonic() < deadline and answer is None:
            try:
                image = next((data / "1").iterdir()).read_bytes()
                answer = httpx.post(f"http://127.0.0.1:{port}/predict", files=[("files", ("d.png", image))],
                                    timeout=10)
            except httpx.HTTPError:
                time.sleep(0.5)
        assert answer is not None and answer.status_code == 200, answer
    finally:
        import psutil

        for child in psutil.Process(server.pid).children():  # the traced server itself, not strace
            child.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            raise
    assert connections(trace) == []
    assert sorted(p.relative_to(home) for p in home.rglob("*")) == []


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
