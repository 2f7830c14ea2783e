#!/usr/bin/env python3
"""Project commands on a fresh machine with only Python 3.11+.

    python3 tasks.py demo [args]   set up .venv, run the demo (python -m dpop_middleware.demo)
    python3 tasks.py test [args]   set up .venv, run the whole test suite (pytest)
    python3 tasks.py lint          ruff and mypy --strict on the package
    python3 tasks.py bench [args]  the benchmarks (python -m benchmarks)
    python3 tasks.py docs [serve]  build the documentation site (mkdocs build --strict, into site/)

The virtual environment lives in .venv and is re-installed when pyproject.toml changes.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PY = BIN / "python"


def ensure_venv() -> None:
    if sys.version_info < (3, 11):
        sys.exit("dpop-middleware needs Python 3.11 or newer")
    stamp = VENV / ".installed"
    want = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if stamp.exists() and stamp.read_text() == want and PY.exists():
        return
    if not PY.exists():
        print("creating .venv ...", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    print("installing dpop-middleware[dev] into .venv ...", flush=True)
    subprocess.run([str(PY), "-m", "pip", "install", "-q", "--upgrade", "pip"], check=True)
    # setuptools prints an "Editable installation ... be careful with folders" banner as a
    # warning from the build backend; it is advice for the project's authors, not an error.
    # Only that one message is silenced (PYTHONWARNINGS reaches pip's build subprocess).
    quiet = dict(os.environ, PYTHONWARNINGS="ignore:Editable installation")
    subprocess.run(
        [str(PY), "-m", "pip", "install", "-q", "-e", f"{ROOT}[dev]"], check=True, env=quiet
    )
    stamp.write_text(want)


def run(*args: str) -> int:
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    return subprocess.call([str(PY), *args], cwd=ROOT, env=env)


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("demo", "test", "lint", "bench", "docs"):
        print(__doc__)
        return 2
    command, rest = argv[0], argv[1:]
    ensure_venv()
    if command == "demo":
        return run("-m", "dpop_middleware.demo", *rest)
    if command == "test":
        return run("-m", "pytest", *rest)
    if command == "bench":
        return run("-m", "benchmarks", *rest)
    if command == "docs":
        # --strict: a broken link or anchor, or a page missing from the nav, fails the build.
        # NO_MKDOCS_2_WARNING silences Material's end-of-life banner, which is not about this site.
        os.environ["NO_MKDOCS_2_WARNING"] = "1"
        if rest[:1] == ["serve"]:
            return run("-m", "mkdocs", "serve", *rest[1:])
        return run("-m", "mkdocs", "build", "--strict", "--site-dir", str(ROOT / "site"), *rest)
    status = run("-m", "ruff", "check", "dpop_middleware", "tests", "benchmarks", "examples")
    return run("-m", "mypy", "--strict", "dpop_middleware") or status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
