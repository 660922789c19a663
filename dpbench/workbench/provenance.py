"""Provenance of a notebook run: hashes, git state, package versions, hardware, manifest.

The runner calls `environment()` and `source_hash()` for the cache key and
`build_manifest(...)` for `manifest.json`. Everything here is cheap and offline; torch is
imported only by `device_info()` (it is a core dependency, but `import dpbench` must not
pay for it).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

# Distributions whose versions can change a result; absent ones (e.g. opacus without the
# `bench` extra) are simply left out of the manifest.
TRACKED_PACKAGES = (
    "dpbench",
    "torch",
    "torchvision",
    "numpy",
    "timm",
    "dp-accounting",
    "opacus",
    "scikit-learn",
    "scipy",
    "pandas",
    "matplotlib",
    "papermill",
    "nbclient",
    "nbformat",
    "ipykernel",
    "safetensors",
    "pyyaml",
)

MANIFEST_VERSION = 1


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of `data`."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    """Hex sha256 of a canonical JSON encoding (sorted keys), for dicts of params etc."""
    return sha256_bytes(json.dumps(obj, sort_keys=True, default=str, separators=(",", ":")).encode())


def package_dir() -> Path:
    """The folder of the dpbench package that is actually imported (this module sits one
    layer down, in dpbench/workbench/)."""
    return Path(__file__).resolve().parents[1]


def source_hash(root: str | os.PathLike | None = None) -> str:
    """Hash of the dpbench source tree: every .py and .mplstyle file, by relative path and
    content, so an edit anywhere in the library invalidates cached runs."""
    root = Path(root) if root else package_dir()
    h = hashlib.sha256()
    files = sorted(p for p in root.rglob("*") if p.suffix in (".py", ".mplstyle") and "__pycache__" not in p.parts)
    for path in files:
        h.update(path.relative_to(root).as_posix().encode() + b"\0")
        h.update(sha256_file(path).encode() + b"\n")
    return h.hexdigest()


def package_versions(names: tuple[str, ...] = TRACKED_PACKAGES) -> dict[str, str]:
    """Installed versions of the tracked distributions (missing ones are left out)."""
    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def environment() -> dict[str, Any]:
    """Python version, implementation and package versions: the part of the cache key
    that says which software ran the notebook."""
    return {
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "packages": package_versions(),
    }


def git_state(repo: str | os.PathLike) -> dict[str, Any]:
    """The git commit of `repo` and whether the work tree is dirty; None values when the
    folder is not a git checkout or git is not installed."""

    def git(*args: str) -> str | None:
        try:
            res = subprocess.run(
                # --no-optional-locks: reading the state must not rewrite the index.
                ["git", "--no-optional-locks", "-C", str(repo), *args],
                capture_output=True,
                text=True,
                timeout=20,
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        return res.stdout if res.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {"commit": None, "dirty": None}
    status = git("status", "--porcelain")
    return {"commit": commit.strip(), "dirty": None if status is None else bool(status.strip())}


def cpu_name() -> str:
    """A human-readable CPU model name (best effort, never raises)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_info(device: str) -> dict[str, Any]:
    """The requested device, torch and CUDA versions, GPU name and CPU of this machine."""
    import torch

    cuda = torch.cuda.is_available()
    info: dict[str, Any] = {
        "requested": device,
        "torch": torch.__version__,
        "cuda_available": cuda,
        "cuda_version": torch.version.cuda,
        "gpu_name": None,
        "gpu_count": torch.cuda.device_count() if cuda else 0,
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
    }
    if cuda:
        index = 0
        if device.startswith("cuda:"):
            try:
                index = int(device.split(":", 1)[1])
            except ValueError:
                index = 0
        info["gpu_name"] = torch.cuda.get_device_name(index)
    return info


def now_iso() -> str:
    """The current time, UTC, ISO 8601 with seconds."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def read_ledger(output_dir: str | os.PathLike) -> Any:
    """The privacy ledger the notebook wrote (`ledger.json` in its output folder), or None."""
    path = Path(output_dir) / "ledger.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        return {"error": f"could not read ledger.json: {exc}"}


def build_manifest(
    *,
    notebook: str,
    profile: str,
    status: str,
    params: dict[str, Any],
    cache_key: str,
    hashes: dict[str, Any],
    upstream: dict[str, str],
    repo: str | os.PathLike,
    env: dict[str, Any],
    device: str,
    seed: Any,
    started: str,
    duration_s: float,
    kernel: str,
    output_dir: str | os.PathLike,
    error: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Assemble the manifest of one run (see the README for its fields)."""
    return {
        "manifest_version": MANIFEST_VERSION,
        "notebook": notebook,
        "profile": profile,
        "status": status,
        "error": error,
        "cache_key": cache_key,
        "params": params,
        "requires": sorted(upstream),
        "upstream": upstream,
        "hashes": hashes,
        "git": git_state(repo),
        "python": env.get("python"),
        "packages": env.get("packages", {}),
        "device": device_info(device),
        "seed": seed,
        "started": started,
        "finished": now_iso(),
        "duration_s": round(float(duration_s), 3),
        "kernel": kernel,
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv and sys.argv[0] else "",
        "privacy": read_ledger(output_dir),
    }
