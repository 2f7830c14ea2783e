"""The README's framework snippets type-check under ``mypy --strict``, in one mypy run.

Every fenced ``python`` block between ``### Starlette`` and ``### What the app gets`` is written
to a file of its own and checked. A block that is deliberately not a complete program starts
with ``# readme: fragment`` and is skipped. Django has no type hints of its own (no stubs are
installed), so its imports are ``Any`` and subclassing its classes is allowed there.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIRST = "### Starlette\n"
LAST = "### What the app gets: `DPoPResult`"
SKIP = "# readme: fragment"
BLOCK = re.compile(r"^```python\n(.*?)^```$", re.S | re.M)
CONFIG = """\
[mypy]
strict = True
python_version = 3.11

[mypy-django.*]
ignore_missing_imports = True
"""
#: Django's classes are ``Any`` without stubs; subclassing them is what its users do.
DJANGO_HEADER = "# mypy: allow-subclassing-any\n"


def snippets() -> dict[str, str]:
    """``readme_<section>_<n>`` -> code, for the framework sections."""
    text = (ROOT / "README.md").read_text()
    part = text[text.index(FIRST) : text.index(LAST)]
    out: dict[str, str] = {}
    for section in re.split(r"^### ", part, flags=re.M)[1:]:
        name = re.sub(r"\W+", "_", section.split("\n", 1)[0].split(":")[0].strip().lower())
        for n, block in enumerate(BLOCK.findall(section)):
            if not block.lstrip().startswith(SKIP):
                out[f"readme_{name}_{n}"] = block
    return out


def test_every_framework_section_has_a_checked_snippet() -> None:
    names = snippets()
    for framework in ("starlette", "fastapi", "flask", "django"):
        assert any(n.startswith(f"readme_{framework}_") for n in names), framework


def test_readme_snippets_pass_mypy_strict(tmp_path: Path) -> None:
    for name, code in snippets().items():
        header = DJANGO_HEADER if name.startswith("readme_django_") else ""
        (tmp_path / f"{name}.py").write_text(header + code)
    (tmp_path / "mypy.ini").write_text(CONFIG)
    files = sorted(str(p) for p in tmp_path.glob("readme_*.py"))
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--config-file",
            str(tmp_path / "mypy.ini"),
            "--cache-dir",
            str(ROOT / ".mypy_cache"),
            "--no-error-summary",
            *files,
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "MYPYPATH": str(ROOT)},
        timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr
