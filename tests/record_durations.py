"""Write tests/durations.json, the seconds each test took, from a JUnit XML report of the suite.

``tests/conftest.py`` hands the modules to the xdist workers costliest first by these numbers (a test not in
the file is estimated from its tiers), so the workers finish together. Refresh them after adding or changing
slow tests, on an otherwise idle machine, with the suite as ``make test`` runs it::

    make test PYTEST_ARGS=--junitxml=/tmp/suite.xml && python tests/record_durations.py /tmp/suite.xml
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

OUT = Path(__file__).with_name("durations.json")


def durations(report: Path) -> dict[str, float]:
    """Seconds per test id (setup, call and teardown), in the report's order."""
    seconds: dict[str, float] = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        node = case.get("classname", "").replace(".", "/") + ".py::" + case.get("name", "")
        seconds[node] = round(seconds.get(node, 0.0) + float(case.get("time") or 0), 1)
    return seconds


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(f"usage: python {sys.argv[0]} REPORT.xml")
    OUT.write_text(json.dumps(durations(Path(sys.argv[1])), indent=0, sort_keys=True) + "\n")
    print(f"wrote {OUT}")
