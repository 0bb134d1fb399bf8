"""The rendered Kubernetes manifests of every overlay under deploy/k8s/overlays/.

`kubectl kustomize` renders them (kubectl is on the development and CI images); without it
the tests skip with a message, or fail under LORAGATE_REQUIRE_SERVICES=1 as the service
fixtures do.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
OVERLAYS = ROOT / "deploy" / "k8s" / "overlays"
OVERLAY_NAMES = sorted(p.name for p in OVERLAYS.iterdir() if p.is_dir())


def render(overlay: str) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        message = "kubectl is not installed: cannot render deploy/k8s"
        if os.environ.get("LORAGATE_REQUIRE_SERVICES") == "1":
            pytest.fail(f"{message} (LORAGATE_REQUIRE_SERVICES=1)", pytrace=False)
        pytest.skip(message)
    out = subprocess.run([kubectl, "kustomize", str(OVERLAYS / overlay)], check=True,
                         capture_output=True, text=True, timeout=60).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


_RENDERED: dict[str, list[dict[str, Any]]] = {}


@pytest.fixture(params=OVERLAY_NAMES)
def manifests(request: pytest.FixtureRequest) -> tuple[str, list[dict[str, Any]]]:
    """(overlay name, its rendered objects), rendered once per session."""
    name: str = request.param
    if name not in _RENDERED:
        _RENDERED[name] = render(name)
    return name, _RENDERED[name]
