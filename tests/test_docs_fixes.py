"""Documentation snippets that must work as copied: the Django entry points, the DPoPResult import
and the token client example (``docs/*.md``)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent.parent / "docs"


def page(name: str) -> str:
    return (DOCS / name).read_text()


def block(name: str, first_line: str) -> str:
    """The python code block of ``docs/<name>`` that starts with ``first_line``."""
    for code in re.findall(r"```python\n(.*?)```", page(name), re.S):
        if code.startswith(first_line + "\n"):
            return str(code)
    raise AssertionError(f"no block of docs/{name} starts with {first_line!r}")


def test_django_entry_points_work_as_copied(tmp_path: Path) -> None:
    site = tmp_path / "mysite"
    site.mkdir()
    (site / "__init__.py").write_text("")
    (site / "urls.py").write_text("urlpatterns = []\n")
    (site / "settings.py").write_text(
        block("django.md", "# settings.py")
        + 'SECRET_KEY = "x" * 50\nROOT_URLCONF = "mysite.urls"\nALLOWED_HOSTS = ["*"]\n'
        + "INSTALLED_APPS: list[str] = []\n"
    )
    (site / "wsgi.py").write_text(block("django.md", "# wsgi.py"))
    (site / "asgi.py").write_text(block("django.md", "# asgi.py"))
    env = {k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"}
    code = (
        "import mysite.wsgi, mysite.asgi\n"
        "print(type(mysite.wsgi.application).__name__, type(mysite.asgi.application).__name__)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["DPoPWSGIMiddleware", "DPoPMiddleware"]


def test_dpop_result_import_path_in_the_docs() -> None:
    from dpop_middleware import DPoPResult
    from dpop_middleware.core.verifier import DPoPResult as core_result

    assert "from dpop_middleware import DPoPResult" in page("adapters.md")
    assert DPoPResult is core_result


def test_the_token_client_example_runs(tmp_path: Path) -> None:
    program = tmp_path / "token_client_example.py"
    program.write_text(
        block(
            "clients.md",
            "# token_client_example.py: a complete program (the test kit stands in for your servers)",
        )
    )
    done = subprocess.run(
        [sys.executable, str(program)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "{'sub': 'my-app'}\n"
