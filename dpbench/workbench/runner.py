"""Execute one notebook: papermill into a temporary folder, the cache key, the manifest,
and the atomic swap into `results/<profile>/<NB>/` (or `.failed/<NB>/` on failure).

The notebook executes into `results/P/.tmp-NB-*`; on success a `manifest.json` is written
there and the folder replaces `results/P/NB` atomically; on failure it goes to
`results/P/.failed/NB` and the last good results stay as they were. A rerun whose cache key
(notebook, params, dpbench source, environment, upstream manifests) matches an `ok`
manifest is skipped. Parameters and pre-flight checks live in `params`; the order of
several notebooks and parallel jobs in `scheduling`.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dpbench.atomic import write_json_atomic
from dpbench.errors import UserError
from dpbench.workbench import provenance
from dpbench.workbench import params
from dpbench.workbench.params import RunSpec

KERNEL_NAME = "dpbench"
FAILED_DIR = ".failed"
RESULTS_ENV = "DPBENCH_RESULTS"
RESULTS_ROOT_ENV = "DPBENCH_RESULTS_ROOT"
ROOT_ENV = "DPBENCH_ROOT"
# results/gpu/ is committed and must only ever hold runs on CUDA: a gpu profile that runs
# without CUDA (device: auto on a CPU machine) writes under this root instead.
GPU_WITHOUT_CUDA_DIR = "gpu-profile-on-cpu"
DRYRUN_DIR = "dryrun"  # `dpbench run NB --profile gpu --dry-run` (dpbench.workbench.dryrun)


# --------------------------------------------------------------------------- locations


def find_repo(start: str | os.PathLike | None = None) -> Path:
    """The repository root: `$DPBENCH_ROOT`, else the first folder from `start` (default
    the current directory) upwards that holds both `notebooks/` and `params/`."""
    env = os.environ.get(ROOT_ENV)
    if env:
        root = Path(env).expanduser().resolve()
        if not (root / "notebooks").is_dir() or not (root / "params").is_dir():
            raise UserError(f"${ROOT_ENV}={env} has no notebooks/ and params/ folders; point it at the dpbench checkout")
        return root
    here = Path(start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / "notebooks").is_dir() and (folder / "params").is_dir():
            return folder
    raise UserError(
        f"no dpbench checkout (a folder with notebooks/ and params/) at or above {here}; "
        f"cd into the repository or set ${ROOT_ENV}"
    )


def results_root(repo: str | os.PathLike | None = None) -> Path:
    """Where results land: `$DPBENCH_RESULTS`, else `<repo>/results`."""
    env = os.environ.get(RESULTS_ENV)
    if env:
        return Path(env).expanduser().resolve()
    return Path(repo or find_repo()) / "results"


def upstream_dir(profile: str, notebook: str) -> Path:
    """The results folder of an upstream notebook, for a notebook that uses its outputs
    (e.g. 03's public checkpoint). Inside a runner-started kernel the results root comes
    from `$DPBENCH_RESULTS_ROOT`; interactively it is found like the runner finds it.
    Raises UserError when that notebook has no successful run on `profile`."""
    root = os.environ.get(RESULTS_ROOT_ENV)
    base = Path(root) if root else results_root()
    path = base / profile / notebook
    manifest = read_manifest(path)
    if not manifest or manifest.get("status") != "ok":
        raise UserError(
            f"no successful results of {notebook} on profile {profile} at {path}; "
            f"run `dpbench run {notebook} --profile {profile}` first"
        )
    return path


def read_manifest(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The manifest.json in `folder`, or None when there is none (or it is unreadable)."""
    path = Path(folder) / "manifest.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def profile_root(results: str | os.PathLike, profile: str) -> Path:
    """The results root that runs of `profile` on this machine use, below the results folder
    `results`: itself, or `results/gpu-profile-on-cpu/` for a gpu profile without CUDA (so
    that `results/gpu/` is written only by runs on CUDA). The runner and the report use it."""
    if profile in params.GPU_PROFILES and not params.cuda_available():
        return Path(results) / GPU_WITHOUT_CUDA_DIR
    return Path(results)


# --------------------------------------------------------------------------- execution


@dataclass
class RunResult:
    """Outcome of one notebook: status is ok, skipped (cached) or failed."""

    notebook: str
    profile: str
    status: str
    path: Path
    duration_s: float = 0.0
    error: dict[str, str] | None = None

    @property
    def ok(self) -> bool:
        return self.status in ("ok", "skipped")


def kernel_name() -> str:
    """The "dpbench" kernel when `make venv` registered it in this environment, else
    "python3" (which jupyter_client maps to this interpreter)."""
    spec = Path(sys.prefix) / "share" / "jupyter" / "kernels" / KERNEL_NAME / "kernel.json"
    return KERNEL_NAME if spec.is_file() else "python3"


class Runner:
    """Runs notebooks of one repository, with one results root."""

    def __init__(self, repo: str | os.PathLike | None = None, results: str | os.PathLike | None = None,
                 progress: bool = True, out=None, dry_run: bool = False):
        self.repo = Path(repo).resolve() if repo else find_repo()
        self.results = Path(results) if results else results_root(self.repo)
        self.dry_run = dry_run  # `--dry-run`: everything goes under results/dryrun/
        self.progress = progress
        self.out = out or sys.stderr
        self._env: dict[str, Any] | None = None
        self._source: str | None = None

    # -- paths
    def root_for(self, profile: str) -> Path:
        """The results root of `profile`: `results/`, except for the gpu profile on a
        machine without CUDA, which goes to `results/gpu-profile-on-cpu/` so that
        `results/gpu/` only ever holds runs on CUDA. A dry run (`--dry-run`) always writes
        under `results/dryrun/`."""
        if self.dry_run:
            return self.results / DRYRUN_DIR
        return profile_root(self.results, profile)

    def result_dir(self, profile: str, notebook: str) -> Path:
        return self.root_for(profile) / profile / notebook

    def failed_dir(self, profile: str, notebook: str) -> Path:
        return self.root_for(profile) / profile / FAILED_DIR / notebook

    # -- cache
    def environment(self) -> dict[str, Any]:
        if self._env is None:
            self._env = provenance.environment()
        return self._env

    def source_hash(self) -> str:
        if self._source is None:
            self._source = provenance.source_hash()
        return self._source

    def upstream_hashes(self, spec: RunSpec) -> dict[str, str]:
        """sha256 of each upstream's manifest.json (a rerun upstream changes the key)."""
        out = {}
        for up in spec.requires:
            path = self.result_dir(spec.profile, up) / "manifest.json"
            manifest = read_manifest(path.parent)
            if not manifest or manifest.get("status") != "ok":
                raise UserError(f"{spec.notebook} requires {up}, which has no ok results on profile {spec.profile}")
            out[up] = provenance.sha256_file(path)
        return out

    def hashes(self, spec: RunSpec) -> dict[str, Any]:
        return {
            "notebook": provenance.sha256_file(spec.nb_path),
            "params_file": provenance.sha256_file(spec.params_path) if spec.params_path else None,
            "params": provenance.sha256_json(spec.params),
            "dpbench_source": self.source_hash(),
            "environment": provenance.sha256_json(self.environment()),
        }

    def cache_key(self, spec: RunSpec, hashes: dict[str, Any], upstream: dict[str, str]) -> str:
        return provenance.sha256_json(
            {k: hashes[k] for k in ("notebook", "params", "dpbench_source", "environment")} | {"upstream": upstream}
        )

    # -- running
    def run(self, spec: RunSpec, force: bool = False) -> RunResult:
        """Execute one resolved, pre-flighted notebook (or skip it when cached)."""
        dest = self.result_dir(spec.profile, spec.notebook)
        upstream = self.upstream_hashes(spec)
        hashes = self.hashes(spec)
        key = self.cache_key(spec, hashes, upstream)
        old = read_manifest(dest)
        if not force and old and old.get("status") == "ok" and old.get("cache_key") == key:
            self._say(f"{spec.notebook} [{spec.profile}]: up to date, skipped (use --force to rerun)")
            return RunResult(spec.notebook, spec.profile, "skipped", dest)

        import papermill as pm
        from traitlets.config import Config

        root = self.root_for(spec.profile)
        if self.dry_run:
            self._say(f"{spec.notebook} [{spec.profile}]: dry run at toy size on the CPU -> {root / spec.profile}")
        elif root != self.results:
            self._say(f"{spec.notebook} [{spec.profile}]: no CUDA device, so this gpu-profile run goes to "
                      f"{root / spec.profile}, never to results/gpu/ (which holds runs on CUDA only)")
        profile_dir = root / spec.profile
        profile_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{spec.notebook}-", dir=profile_dir))
        tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it private; results are ordinary files
        nb_params = dict(spec.params, output_dir=str(tmp))
        kernel = kernel_name()
        started, t0 = provenance.now_iso(), time.perf_counter()
        error = None
        self._say(f"{spec.notebook} [{spec.profile}]: running")
        if spec.profile in params.GPU_PROFILES and spec.device == "cpu" and not self.dry_run:
            self._say(f"{spec.notebook} [{spec.profile}]: runs on the CPU (`device: cpu` in its profile: a GPU "
                      f"would not speed it up)")
        saved_env = os.environ.get(RESULTS_ROOT_ENV)
        os.environ[RESULTS_ROOT_ENV] = str(root)  # upstream_dir() inside the kernel looks here
        sockets = Path(tempfile.mkdtemp(prefix="dpbench-kernel-"))  # short: Unix socket paths are capped
        try:
            pm.execute_notebook(
                str(spec.nb_path),
                str(tmp / "executed.ipynb"),
                parameters=nb_params,
                kernel_name=kernel,
                progress_bar=self.progress,
                cwd=str(spec.nb_path.parent),
                log_output=False,
                config=_kernel_config(Config, sockets),
            )
        except KeyboardInterrupt:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        except Exception as exc:  # any notebook/kernel failure is recorded, not raised
            error = error_info(exc)
        finally:
            shutil.rmtree(sockets, ignore_errors=True)
            if saved_env is None:
                os.environ.pop(RESULTS_ROOT_ENV, None)
            else:
                os.environ[RESULTS_ROOT_ENV] = saved_env
        duration = time.perf_counter() - t0
        status = "ok" if error is None else "failed"
        final = dest if status == "ok" else self.failed_dir(spec.profile, spec.notebook)
        manifest = provenance.build_manifest(
            notebook=spec.notebook,
            profile=spec.profile,
            status=status,
            params=dict(spec.params, output_dir=str(final)),
            cache_key=key,
            hashes=hashes,
            upstream=upstream,
            repo=self.repo,
            env=self.environment(),
            device=spec.device,
            seed=spec.params.get("seed"),
            started=started,
            duration_s=duration,
            kernel=kernel,
            output_dir=tmp,
            error=error,
        )
        # The notebook wrote into a temporary folder that is renamed into place; record both.
        manifest["run_dir"] = str(final)
        if spec.dry_run is not None:
            manifest["dry_run"] = spec.dry_run
        manifest["executed_in"] = str(tmp)
        write_json_atomic(tmp / "manifest.json", manifest)
        swap_in(tmp, final)
        if error:
            self._say(f"{spec.notebook} [{spec.profile}]: FAILED {error['name']}: {error['message']} (see {final})")
        else:
            self._say(f"{spec.notebook} [{spec.profile}]: ok in {duration:.1f} s -> {final}")
        return RunResult(spec.notebook, spec.profile, status, final, duration, error)

    def _say(self, msg: str) -> None:
        print(msg, file=self.out, flush=True)

    # -- status
    def status(self, profile: str, notebook: str) -> str:
        """Last run's status of a notebook on a profile: ok, failed, ok (last attempt
        failed), or "-" when never run."""
        good = read_manifest(self.result_dir(profile, notebook))
        bad = read_manifest(self.failed_dir(profile, notebook))
        if bad and (not good or str(bad.get("started", "")) > str(good.get("started", ""))):
            return "failed" if not good or good.get("status") != "ok" else "ok (last attempt failed)"
        if good:
            return str(good.get("status", "?"))
        return "-"


def _kernel_config(config_cls, socket_dir: Path):
    """Kernels talk to the runner over Unix sockets in a private folder of their own
    instead of loopback TCP: nothing listens on a port, parallel jobs cannot cross wires,
    and ipykernel no longer warns that TCP traffic is unencrypted."""
    config = config_cls()
    config.KernelManager.transport = "ipc"
    config.KernelManager.ip = str(socket_dir / "kernel")
    return config


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def error_info(exc: BaseException) -> dict[str, str]:
    """Error name and first message line; papermill's execution error carries the
    notebook's exception as `ename`/`evalue`."""
    name = getattr(exc, "ename", None) or type(exc).__name__
    text = str(getattr(exc, "evalue", None) or exc).strip()
    return {"name": str(name), "message": text.splitlines()[0][:2000] if text else ""}


def swap_in(src: Path, dest: Path) -> None:
    """Replace folder `dest` with `src`: rename the old one aside, rename the new one in,
    then delete the old one; readers see either the old or the new folder, never a mix."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    old = None
    if dest.exists():
        old = dest.with_name(f".old-{dest.name}-{os.getpid()}-{time.time_ns()}")
        os.rename(dest, old)
    try:
        os.rename(src, dest)
    except BaseException:
        if old is not None:
            os.rename(old, dest)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------- entry points


