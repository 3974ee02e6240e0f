"""Create one virtual environment per peer under ``.peers/<name>/`` and pip-install the pinned peer into it.

    python -m perf.peers.install [--only prefect,dbos,langgraph] [--force]

Each venv is made with the interpreter running this module (``python -m venv``); an install happens only when
the venv is missing or its stamp file does not name the pinned requirements, so reruns cost nothing. None of
these packages is a dependency of aobd: they live in their own environments and are reached only as subprocesses.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PEERS_DIR = ROOT / ".peers"

#: The versions measured (docs/peers.md); bump them here and the next run reinstalls.
PINS: dict[str, list[str]] = {
    "prefect": ["prefect==3.9.1"],
    "dbos": ["dbos==3.4.0"],
    "langgraph": ["langgraph==1.2.24", "langgraph-checkpoint-sqlite==3.1.2"],
}
STAMP = ".perf-peers-installed"


def venv_python(name: str) -> Path:
    return PEERS_DIR / name / "bin" / "python"


def _pip(python: Path, args: list[str]) -> None:
    """pip install, its stderr passed on without the noise of unreachable extra index locations."""
    proc = subprocess.run([str(python), "-m", "pip", "install", *args], stderr=subprocess.PIPE, text=True)
    for line in proc.stderr.splitlines():
        if not line.startswith("WARNING: Location"):
            print(line, file=sys.stderr)
    if proc.returncode:
        raise SystemExit(f"pip install {' '.join(args)} failed ({proc.returncode})")


def ensure(name: str, force: bool = False, quiet: bool = True) -> Path:
    """The peer's interpreter, after creating its venv and installing its pins if needed."""
    venv = PEERS_DIR / name
    python = venv_python(name)
    wanted = "\n".join(PINS[name]) + "\n"
    stamp = venv / STAMP
    if not force and python.exists() and stamp.exists() and stamp.read_text() == wanted:
        return python
    if not python.exists():
        print(f"[peers] creating {venv}", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    print(f"[peers] installing {' '.join(PINS[name])} into {venv}", file=sys.stderr)
    q = ["-q"] if quiet else []
    _pip(python, [*q, "--upgrade", "pip"])
    _pip(python, [*q, *PINS[name]])
    stamp.write_text(wanted)
    return python


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m perf.peers.install", description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=",".join(PINS), help="comma-separated peers (default: all)")
    parser.add_argument("--force", action="store_true", help="reinstall even if the stamp matches")
    args = parser.parse_args(argv)
    for name in [n.strip() for n in args.only.split(",") if n.strip()]:
        if name not in PINS:
            parser.error(f"unknown peer {name!r}; known: {', '.join(PINS)}")
        print(ensure(name, force=args.force))
    return 0


if __name__ == "__main__":
    sys.exit(main())
