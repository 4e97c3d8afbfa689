"""Run the README's tour as written, line by line, in a fresh folder, and time each line.

    python benchmarks/tour.py            # writes benchmarks/tour.json (machine named), prints the timings

tests/test_readme.py runs the same lines (without writing the JSON), so the tour cannot rot.
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
