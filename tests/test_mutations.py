"""The hot-loop tests catch the bugs they are there for.

Each mutation in ``tests/mutations.py`` is planted in a copy of the
``prefork`` package (in the twin, ``_fastio_py.py``), and the test named for
it is run against the copy in a subprocess with ``PREFORK_NO_EXTENSIONS=1``:
it must fail. The same tests must pass against an unmutated copy, so a
failure is the bug's doing. The subprocess imports the copy, not this
checkout: it runs from the copy's directory and checks ``prefork.__file__``
before it runs pytest.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import prefork

from mutations import MUTATIONS, Mutation

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = Path(prefork.__file__).resolve().parent
TWIN = "_fastio_py.py"

# Run in the subprocess: the copy must be what is imported, the twin what is chosen.
RUNNER = """
import os, sys
import prefork
from prefork import fastio
copy = os.path.realpath(sys.argv[1])
where = os.path.realpath(prefork.__file__)
if not where.startswith(copy + os.sep):
    sys.exit(f"prefork was imported from {where}, not from the copy in {copy}")
if fastio.IMPLEMENTATION != "python":
    sys.exit(f"the hot loop is {fastio.IMPLEMENTATION}, not the twin")
import pytest
# Without the benchmark and hypothesis plugins, which the catchers do not use,
# pytest starts in a third of the time.
plugins = ["-p", "no:cacheprovider", "-p", "no:benchmark", "-p", "no:hypothesispytest"]
sys.exit(pytest.main(["-x", "-q", *plugins, *sys.argv[2:]]))
"""


def copy_package(into: Path, mutation: Mutation | None = None) -> Path:
    """A copy of the package in ``into``, with ``mutation`` planted."""
    shutil.copytree(PACKAGE, into / "prefork", ignore=shutil.ignore_patterns("__pycache__", "*.c"))
    if mutation is not None:
        twin = into / "prefork" / TWIN
        source = twin.read_text()
        found = source.count(mutation.snippet)
        assert found == 1, f"{mutation.name}: the snippet occurs {found} times in {TWIN}"
        twin.write_text(source.replace(mutation.snippet, mutation.replacement))
    return into


def run_tests(copy: Path, *nodeids: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(copy), PREFORK_NO_EXTENSIONS="1")
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return subprocess.run(
        [sys.executable, "-c", RUNNER, str(copy), *(str(ROOT / nodeid) for nodeid in nodeids)],
        cwd=copy,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        stdin=subprocess.DEVNULL,
    )


def test_every_mutation_names_a_distinct_bug():
    names = [mutation.name for mutation in MUTATIONS]
    assert len(set(names)) == len(names)
    snippets = [mutation.snippet for mutation in MUTATIONS]
    assert len(set(snippets)) == len(snippets)


def test_the_unmutated_copy_passes_every_catcher(tmp_path):
    catchers = sorted({mutation.catcher for mutation in MUTATIONS})
    result = run_tests(copy_package(tmp_path), *catchers)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    passed = re.search(r"(\d+) passed", output)
    assert passed and int(passed.group(1)) == len(catchers), output
    assert "skipped" not in output, output


@pytest.mark.parametrize("mutation", MUTATIONS, ids=[m.name for m in MUTATIONS])
def test_the_mutation_is_caught(tmp_path, mutation):
    result = run_tests(copy_package(tmp_path, mutation), mutation.catcher)
    output = result.stdout + result.stderr
    # 1: a test failed. Not 2 or more: an import or collection error would be
    # the copy's breakage, not the test catching the bug.
    assert result.returncode == 1, f"{mutation.name} was not caught:\n{output}"
    assert re.search(r"\b1 failed\b", output), output
