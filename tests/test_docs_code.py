"""Every Python block on the documentation site (``docs/*.md``) and in the README is either run,
type-checked or declared a fragment, so the docs cannot rot.

The line just before each fenced ``python`` block is a marker (an HTML comment, invisible on the
site and on GitHub):

* ``<!-- run -->``: a complete program; run with this interpreter (timeout 60 s), exit status 0;
* ``<!-- typecheck -->``: a complete module; all of them are checked in one ``mypy --strict``
  run. Django has no type hints of its own (no stubs are installed), so in a block that imports
  it the imports are ``Any`` and subclassing its classes is allowed;
* ``<!-- fragment -->``: deliberately not a complete program (it uses names defined elsewhere);
* ``name=NAME`` gives a block a name, and ``after=NAME`` puts that earlier block of the same page
  in front of this one (the five-line framework snippets share one ``SETTINGS`` block).

A ``python`` block without a marker fails the test: a new example must say which kind it is.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGES = [*sorted((ROOT / "docs").glob("*.md")), ROOT / "README.md"]
MARKER = re.compile(r"^\s*<!-- (run|typecheck|fragment)((?: \w+=[\w-]+)*) -->$")
FENCE = re.compile(r"^(\s*)```python\s*$")
CONFIG = """\
[mypy]
strict = True
python_version = 3.11

[mypy-django.*]
ignore_missing_imports = True
"""
#: Django's classes are ``Any`` without stubs; subclassing them is what its users do.
DJANGO_HEADER = "# mypy: allow-subclassing-any\n"


@dataclass(frozen=True)
class Block:
    page: str
    line: int
    kind: str
    code: str
    name: str | None
    after: str | None

    @property
    def ident(self) -> str:
        return f"{Path(self.page).stem.replace('-', '_')}_{self.line}"


def page_blocks(path: Path) -> tuple[list[Block], list[str]]:
    """The python blocks of one page, and the problems found (unmarked blocks, bad markers)."""
    lines = path.read_text().split("\n")
    blocks: list[Block] = []
    problems: list[str] = []
    named: dict[str, Block] = {}
    for i, line in enumerate(lines):
        fence = FENCE.match(line)
        marker = MARKER.match(line)
        if marker and not (i + 1 < len(lines) and FENCE.match(lines[i + 1])):
            problems.append(f"{path.name}:{i + 1}: a marker not followed by a python block")
        if not fence:
            continue
        indent = fence.group(1)
        end = next(j for j in range(i + 1, len(lines)) if lines[j] == f"{indent}```")
        code = textwrap.dedent("\n".join(lines[i + 1 : end])) + "\n"
        found = MARKER.match(lines[i - 1]) if i else None
        if not found:
            problems.append(
                f"{path.name}:{i + 1}: python block without a run/typecheck/fragment marker"
            )
            continue
        options = dict(o.split("=", 1) for o in found.group(2).split())
        if set(options) - {"name", "after"}:
            problems.append(f"{path.name}:{i}: unknown marker option in {lines[i - 1].strip()!r}")
        after = options.get("after")
        if after is not None:
            if after not in named:
                problems.append(f"{path.name}:{i}: after={after} names no earlier block")
                continue
            code = named[after].code + "\n" + code
        block = Block(path.name, i + 1, found.group(1), code, options.get("name"), after)
        if block.name:
            named[block.name] = block
        blocks.append(block)
    return blocks, problems


def all_blocks() -> list[Block]:
    return [b for page in PAGES for b in page_blocks(page)[0]]


def test_every_python_block_is_marked() -> None:
    problems = [p for page in PAGES for p in page_blocks(page)[1]]
    assert not problems, "\n".join(problems)
    assert len(all_blocks()) >= 20


def test_every_framework_page_has_a_checked_block() -> None:
    for framework in ("starlette", "fastapi", "flask", "django"):
        kinds = {b.kind for b in all_blocks() if b.page == f"{framework}.md"}
        assert "typecheck" in kinds, framework


def test_typecheck_blocks_pass_mypy_strict(tmp_path: Path) -> None:
    blocks = [b for b in all_blocks() if b.kind == "typecheck"]
    for b in blocks:
        header = DJANGO_HEADER if "django" in b.code else ""
        (tmp_path / f"doc_{b.ident}.py").write_text(header + b.code)
    (tmp_path / "mypy.ini").write_text(CONFIG)
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
            *sorted(str(p) for p in tmp_path.glob("doc_*.py")),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "MYPYPATH": str(ROOT)},
        timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr


def test_run_blocks_run(tmp_path: Path) -> None:
    blocks = [b for b in all_blocks() if b.kind == "run"]
    assert blocks

    def run(b: Block) -> tuple[Block, subprocess.CompletedProcess[str]]:
        program = tmp_path / f"doc_{b.ident}.py"
        program.write_text(b.code)
        done = subprocess.run(
            [sys.executable, str(program)],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=tmp_path,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        return b, done

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(run, blocks))
    failed = [f"{b.page}:{b.line}\n{done.stderr[-2000:]}" for b, done in results if done.returncode]
    assert not failed, "\n\n".join(failed)
