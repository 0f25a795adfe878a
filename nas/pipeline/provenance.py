"""What a run records about itself: the spec and its hash, the code and package
versions, the backbone weights' hashes, and one entry per session that continued it."""

from __future__ import annotations

import platform
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from nas.core.errors import NasError
from nas.core.jsonio import read_json, write_json
from nas.core.paths import REPO_ROOT
from nas.data.hashing import file_sha256
from nas.pipeline.layout import run_layout
from nas.spec.experiment import ExperimentSpec

PACKAGES = (
    "torch",
    "timm",
    "ray",
    "optuna",
    "mlflow",
    "numpy",
    "safetensors",
    "open-clip-torch",
    "nas-prompt",
)


def code_version() -> str:
    here = REPO_ROOT
    try:
        out = subprocess.run(
            ["git", "-C", str(here), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        if out.returncode == 0:
            return out.stdout.strip()
    except OSError:
        pass
    return "unknown"


def provenance(spec: ExperimentSpec) -> dict[str, Any]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    files = spec.backbone.weight_files()
    local, text_weights = files.get("backbone"), files.get("clip_text")
    return {
        "spec_hash": spec.hash(),
        "spec": spec.to_data(),
        "code_version": code_version(),
        "python": platform.python_version(),
        "packages": versions,
        "backbone_weights_sha256": file_sha256(local) if local else None,
        "clip_text_weights_sha256": file_sha256(text_weights) if text_weights else None,
        "seeds": list(spec.seeds),
    }


def spec_diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new)):
            out += spec_diff(old.get(k), new.get(k), f"{prefix}.{k}" if prefix else k)
        return out
    return [] if old == new else [prefix]


def record_output(spec: ExperimentSpec) -> None:
    """Create the output folder and record the spec and its provenance (each session added)."""
    prov_path = run_layout(spec).provenance
    try:
        spec.output.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise NasError(f"output {spec.output}: cannot create it ({exc.strerror})") from None
    record = provenance(spec)
    session = {k: record[k] for k in ("code_version", "python", "packages")}
    session["started"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    if prov_path.is_file():  # a resumed run: the first record stays, each session is added
        old = read_json(prov_path)
        sessions = old.get("sessions") or [{k: old.get(k) for k in session if k != "started"}]
        if sessions[-1].get("code_version") != session["code_version"]:
            print(
                f"warning: {spec.output} was run by code {sessions[-1].get('code_version')} and "
                f"continues with {session['code_version']}; both are recorded in provenance.json",
                flush=True,
            )
        if old.get("spec_hash") != record["spec_hash"]:  # continued with changed later stages
            session["spec_hash"] = record["spec_hash"]
            session["changed"] = spec_diff(old.get("spec", {}), record.get("spec", {}))
        record = {
            **old,
            "spec": record.get("spec"),
            "spec_hash": record["spec_hash"],
            "sessions": [*sessions, session],
        }
    else:
        record["sessions"] = [session]
    write_json(prov_path, record)
    if spec.path:
        (spec.output / "spec.yaml").write_text(Path(spec.path).read_text())
