#!/usr/bin/env python3
"""Copy the RAGDeployment CRD from crds/ into the Helm chart, byte for byte.

crds/ is the one source of truth; the chart ships a copy because Helm only
installs CRDs from a chart's own crds/ folder. Run this after editing the CRD:

    python scripts/sync_chart_crd.py          # re-sync the copy
    python scripts/sync_chart_crd.py --check  # exit 1 if the copy differs (CI)
"""

from __future__ import annotations

import argparse
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
SOURCE = ROOT / "crds" / "spotrag.io_ragdeployments.yaml"
CHART_COPY = ROOT / "charts" / "spotrag" / "crds" / SOURCE.name


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 if the chart's copy differs")
    args = parser.parse_args(argv)

    source = SOURCE.read_bytes()
    copy = CHART_COPY.read_bytes() if CHART_COPY.exists() else None
    if copy == source:
        print(f"{CHART_COPY.relative_to(ROOT)} is in sync with {SOURCE.relative_to(ROOT)}")
        return 0
    if args.check:
        print(
            f"{CHART_COPY.relative_to(ROOT)} differs from {SOURCE.relative_to(ROOT)}: "
            "run python scripts/sync_chart_crd.py",
            file=sys.stderr,
        )
        return 1
    CHART_COPY.write_bytes(source)
    print(f"copied {SOURCE.relative_to(ROOT)} to {CHART_COPY.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
