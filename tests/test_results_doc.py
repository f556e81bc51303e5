"""bench/RESULTS.md says only what its stored data says.

Every table in it is the report of a stored run, made again here from the data
file alone: the generated section from ``bench/results.json``, every other
table from the file its ``<!-- data: FILE -->`` line names (a
``bench/compare.py`` results file, a ``bench/pingpong.py --json`` file, a
``bench/guards.py``, ``bench/tls.py`` or ``bench/tls_clients.py`` run).
A figure quoted in the prose (a ratio such as ``1.05x``) must appear in one of
those tables, so a sentence cannot keep a number its data no longer gives.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "RESULTS.md"
BEGIN = "<!-- bench/compare.py: generated section begins -->"
END = "<!-- bench/compare.py: generated section ends -->"
DATA = re.compile(r"^<!-- data: (\S+) -->\n+```\n(.*?)```$", re.M | re.S)
FENCED = re.compile(r"^```[^\n]*\n.*?^```$", re.M | re.S)
RATIO = re.compile(r"(?<![\w.])(\d+\.\d\d)x\b")

pytestmark = pytest.mark.timeout(60)


def render(data: Path) -> str:
    """The report of a stored run, made by the script that made the run."""
    head = data.read_text()[:200]
    script = "pingpong.py" if '"mode"' in head else "compare.py"
    for named in ("guards.py", "tls.py", "tls_clients.py"):  # runs that name their script
        if f'"script": "{named}"' in head:
            script = named
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), "--render", str(data)],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT / "bench",
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip("\n")


def test_the_generated_section_is_the_report_of_results_json():
    text = RESULTS.read_text()
    section = text[text.index(BEGIN) : text.index(END)]
    (block,) = re.findall(r"^```\n(.*?)^```$", section, re.M | re.S)
    assert block.strip("\n") == render(ROOT / "bench" / "results.json")


def test_every_other_table_is_the_report_of_the_data_it_names():
    text = RESULTS.read_text()
    outside = text[: text.index(BEGIN)] + text[text.index(END) :]
    backed = DATA.findall(outside)
    assert backed, "RESULTS.md quotes no stored run outside the generated section"
    for name, block in backed:
        path = ROOT / "bench" / name
        assert path.is_file(), f"{name} is named in RESULTS.md but not stored"
        assert block.strip("\n") == render(path), f"the table from {name} is not its data's"
    # No table without its data: every fenced block is one of the above.
    assert len(FENCED.findall(outside)) == len(backed)


def test_ratios_in_the_prose_come_from_the_tables():
    text = RESULTS.read_text()
    tables = "\n".join(FENCED.findall(text))
    prose = FENCED.sub("", text)
    quoted = set(RATIO.findall(prose))
    assert quoted, "no ratio quoted in the prose: is RATIO still right?"
    missing = sorted(r for r in quoted if not re.search(rf"(?<![\d.]){re.escape(r)}x", tables))
    assert not missing, f"ratios in RESULTS.md's prose that no table gives: {missing}"
