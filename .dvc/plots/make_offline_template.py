"""Writes offline.html, the page template of `dvc plots show` (.dvc/config: plots.html_template), with Vega,
Vega-Lite and Vega-Embed inlined so that the plots render without internet (DVC's own page loads them from a CDN).

The versions are the ones DVC's renderer (dvc-render) loads. To regenerate, from the repository root:

    mkdir -p /tmp/vega && cd /tmp/vega && npm pack vega@5.20.2 vega-lite@5.2.0 vega-embed@6.18.2 \
        && for f in *.tgz; do mkdir -p "${f%.tgz}" && tar xzf "$f" -C "${f%.tgz}"; done && cd -
    python .dvc/plots/make_offline_template.py /tmp/vega

The libraries are BSD-3-Clause (University of Washington Interactive Data Lab): their licence is kept in
LICENSE-vega.txt beside the template and named in a comment before each script.
"""

from __future__ import annotations

import sys
from pathlib import Path

PACKAGES = {"vega": "5.20.2", "vega-lite": "5.2.0", "vega-embed": "6.18.2"}
HERE = Path(__file__).resolve().parent

PAGE = """<!DOCTYPE html>
<html>
<head>
    {refresh_tag}
    <meta charset="utf-8">
    <title>DVC Plot</title>
    <!-- Vega, Vega-Lite and Vega-Embed inlined (no CDN): see .dvc/plots/make_offline_template.py -->
SCRIPTS
    <style>
        table {
            border-spacing: 15px;
        }
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
"""


def main(unpacked: Path) -> None:
    scripts, licences = [], []
    for name, version in PACKAGES.items():
        package = unpacked / f"{name}-{version}" / "package"
        code = (package / "build" / f"{name}.min.js").read_text(encoding="utf-8")
        # the page is filled by str.replace of these placeholders: the libraries must not contain them
        for placeholder in ("{plot_divs}", "{scripts}", "{refresh_tag}", "</script"):
            if placeholder in code:
                raise SystemExit(f"{name}.min.js contains {placeholder!r}: cannot inline it")
        scripts.append(f"    <!-- {name} {version}, BSD-3-Clause, see LICENSE-vega.txt -->\n"
                       f"    <script>{code}</script>")
        licences.append(f"{name} {version}\n\n{(package / 'LICENSE').read_text(encoding='utf-8').strip()}\n")
    (HERE / "offline.html").write_text(PAGE.replace("SCRIPTS", "\n".join(scripts)), encoding="utf-8")
    (HERE / "LICENSE-vega.txt").write_text("\n\n".join(licences), encoding="utf-8")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("/tmp/vega"))
