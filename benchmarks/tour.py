"""Run the README's tour as written, line by line, in a fresh folder, and time each line.

    python benchmarks/tour.py            # writes benchmarks/tour.json (machine named), prints the timings

tests/test_readme.py runs the same lines (without writing the JSON), so the tour cannot rot: in one process
(`run_tour_in_process`, each line through the same typer app a shell would start; it saves the 18 interpreter starts
that import torch), while this script times each line as a user's shell runs it, a process per line.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MARKER = "<!-- tour: every line below is run by tests/test_readme.py -->"


def tour_commands(readme: Path = ROOT / "README.md", marker: str = MARKER) -> list[str]:
    """The lines of the fenced bash block right after `marker` (the tour's, or another runnable README block)."""
    text = readme.read_text()
    block = text[text.index(marker):].split("```bash\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def run_tour(workdir: Path, timeout: float = 600) -> list[dict]:
    """Each line through bash in `workdir`, with this interpreter's bin folder first on PATH."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    results = []
    for command in tour_commands():
        started = time.perf_counter()
        done = subprocess.run(["bash", "-c", command], cwd=workdir, env=env, capture_output=True, text=True,
                              timeout=timeout)
        results.append({"command": command.split("  #")[0].strip(), "seconds": round(time.perf_counter() - started, 1),
                        "exit_code": done.returncode, "stdout": done.stdout, "stderr": done.stderr})
        if done.returncode != 0:
            break
    return results


def run_tour_in_process(workdir: Path) -> list[dict]:
    """Each line parsed as a shell would (quotes, comments) and run in this process, in `workdir`: `transfer ...`
    through the CLI's typer app (CliRunner: exit code and output as the shell sees them), `python -m
    transfer.data.samples ...` through its `main`. Only those two kinds of line may appear in the tour."""
    import shlex

    from typer.testing import CliRunner

    import cli
    from transfer.data import samples

    results, runner, previous = [], CliRunner(), Path.cwd()
    os.chdir(workdir)
    try:
        for command in tour_commands():
            words = shlex.split(command, comments=True)
            started = time.perf_counter()
            if words[:3] == ["python", "-m", "transfer.data.samples"]:
                code, stdout = samples.main(words[3:]), ""
            elif words[0] == "transfer":
                result = runner.invoke(cli.app, words[1:])
                code, stdout = result.exit_code, result.output
            else:
                raise ValueError(f"the tour may only run transfer and python -m transfer.data.samples: {command}")
            results.append({"command": command.split("  #")[0].strip(), "exit_code": code, "stdout": stdout,
                            "stderr": stdout, "seconds": round(time.perf_counter() - started, 1)})
            if code != 0:
                break
    finally:
        os.chdir(previous)
    return results


def main() -> int:
    from transfer.serving.predict import machine_name

    with tempfile.TemporaryDirectory() as work:
        results = run_tour(Path(work))
    for row in results:
        print(f"{row['seconds']:6.1f} s  exit {row['exit_code']}  {row['command']}")
    record = {"machine": machine_name(), "python": platform.python_version(),
              "date": time.strftime("%Y-%m-%d"),
              "lines": [{k: row[k] for k in ("command", "seconds", "exit_code")} for row in results]}
    (ROOT / "benchmarks" / "tour.json").write_text(json.dumps(record, indent=2) + "\n")
    return 0 if all(row["exit_code"] == 0 for row in results) else 1


if __name__ == "__main__":
    sys.exit(main())
