#!/usr/bin/env python3
"""Copy the CRDs (RAGDeployment, ModelRoute) from crds/ into the Helm chart, byte for byte.

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
SOURCES = (ROOT / "crds" / "spotrag.io_ragdeployments.yaml", ROOT / "crds" / "spotrag.io_modelroutes.yaml")
SOURCE = SOURCES[0]
CHART_COPY = ROOT / "charts" / "spotrag" / "crds" / SOURCE.name


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 if the chart's copy differs")
    args = parser.parse_args(argv)
    return max(sync(source, ROOT / "charts" / "spotrag" / "crds" / source.name, check=args.check) for source in SOURCES)


def sync(source_path: pathlib.Path, copy_path: pathlib.Path, *, check: bool) -> int:
    source = source_path.read_bytes()
    copy = copy_path.read_bytes() if copy_path.exists() else None
    if copy == source:
        print(f"{copy_path.relative_to(ROOT)} is in sync with {source_path.relative_to(ROOT)}")
        return 0
    if check:
        print(
            f"{copy_path.relative_to(ROOT)} differs from {source_path.relative_to(ROOT)}: "
            "run python scripts/sync_chart_crd.py",
            file=sys.stderr,
        )
        return 1
    copy_path.write_bytes(source)
    print(f"copied {source_path.relative_to(ROOT)} to {copy_path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
