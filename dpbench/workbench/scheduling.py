"""Several notebooks: dependency order (`requires:`), upstreams that must run first, runs in
order, and parallel jobs (`reproduce --jobs N`: one process and Jupyter runtime folder per
job, `exclusive:` notebooks alone, one GPU per CUDA job). `dpbench run` and `dpbench
reproduce` start here.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, Iterable

from tqdm.auto import tqdm

from dpbench.errors import UserError
from dpbench.workbench.params import (
    RunSpec,
    check_notebook,
    check_profile,
    cuda_available,
    list_notebooks,
    list_profiles,
    preflight,
    resolve,
)
from dpbench.workbench.runner import Runner, RunResult, error_info, read_manifest


def plan(runner: Runner, notebooks: list[str], profile: str, overrides=(), run_missing_upstream: bool = True) -> list[RunSpec]:
    """Resolve and pre-flight `notebooks` plus (when `run_missing_upstream`) every
    upstream without an ok result; return them in dependency order. Overrides apply to
    the named notebooks only. Raises UserError before anything runs."""
    check_profile(profile)
    specs: dict[str, RunSpec] = {}
    explicit = [check_notebook(runner.repo, nb).stem for nb in notebooks]

    def visit(nb: str, chain: tuple[str, ...]) -> None:
        if nb in chain:
            raise UserError(f"dependency cycle in `requires`: {' -> '.join(chain + (nb,))}; break the cycle")
        if nb in specs:
            return
        spec = resolve(runner.repo, nb, profile, overrides if nb in explicit else ())
        for up in spec.requires:
            manifest = read_manifest(runner.result_dir(profile, up))
            have = manifest is not None and manifest.get("status") == "ok"
            if up in explicit or not have:
                if not run_missing_upstream and not have:
                    raise UserError(f"{nb} requires {up}, which has no ok results on profile {profile}")
                visit(up, chain + (nb,))
        specs[nb] = spec

    for nb in explicit:
        visit(nb, ())
    ordered = topological(specs)
    for spec in ordered:
        preflight(spec)
    return ordered


def upstream_failed(runner: Runner, spec: RunSpec, bad: list[str]) -> RunResult:
    """The failed result of a notebook not started because its upstreams `bad` failed (said on
    the runner's output)."""
    err = {"name": "UpstreamFailed", "message": f"upstream {', '.join(bad)} failed"}
    runner._say(f"{spec.notebook} [{spec.profile}]: not run, {err['message']}")
    return RunResult(spec.notebook, spec.profile, "failed", runner.failed_dir(spec.profile, spec.notebook), 0.0, err)


def run_in_order(runner: Runner, specs: list[RunSpec], force: bool = False, forced: Iterable[str] = ()) -> list[RunResult]:
    """Run specs in order; a notebook whose upstream failed is not started (failed
    with the reason). `force` reruns everything, `forced` only the named notebooks."""
    forced = set(forced)
    results: list[RunResult] = []
    failed: set[str] = set()
    bar = tqdm(specs, desc="notebooks", unit="nb", disable=not runner.progress or len(specs) < 2, file=runner.out)
    for spec in bar:
        bar.set_postfix_str(spec.notebook)
        bad = [up for up in spec.requires if up in failed]
        if bad:
            results.append(upstream_failed(runner, spec, bad))
            failed.add(spec.notebook)
            continue
        res = runner.run(spec, force=force or spec.notebook in forced)
        results.append(res)
        if not res.ok:
            failed.add(spec.notebook)
    return results


def topological(specs: dict[str, RunSpec]) -> list[RunSpec]:
    """Specs ordered so every upstream (among them) comes first; ties by name."""
    order: list[RunSpec] = []
    done: set[str] = set()

    def visit(name: str) -> None:
        if name in done or name not in specs:
            return
        done.add(name)
        for up in specs[name].requires:
            visit(up)
        order.append(specs[name])

    for name in sorted(specs):
        visit(name)
    return order


def run_notebook(notebook: str, profile: str, overrides=(), force: bool = False, repo=None, progress: bool = True) -> list[RunResult]:
    """`dpbench run`: pre-flight the notebook and any missing upstreams, then run them."""
    runner = Runner(repo, progress=progress)
    specs = plan(runner, [notebook], profile, overrides)
    name = check_notebook(runner.repo, notebook).stem
    return run_in_order(runner, specs, forced=[name] if force else ())


def reproduce(profile: str, force: bool = False, repo=None, progress: bool = True, jobs: int = 1) -> list[RunResult]:
    """`dpbench reproduce`: every notebook that has this profile, in dependency order,
    continuing after failures. All pre-flight checks happen before the first kernel.
    `jobs` > 1 runs independent notebooks at once (see `run_parallel`)."""
    if isinstance(jobs, bool) or int(jobs) != jobs or jobs < 1:
        raise UserError(f"--jobs must be a positive integer, got {jobs!r}")
    runner = Runner(repo, progress=progress)
    check_profile(profile)
    names = [nb for nb in list_notebooks(runner.repo) if profile in list_profiles(runner.repo, nb)]
    if not names:
        raise UserError(f"no notebook has a {profile} profile (params/NB/{profile}.yaml)")
    skipped = [nb for nb in list_notebooks(runner.repo) if nb not in names]
    if skipped:  # e.g. gpu-quick covers notebook 01 only: say which notebooks it leaves out
        runner._say(f"profile {profile}: runs {', '.join(names)}; not in this profile (no params/NB/{profile}.yaml): "
                    f"{', '.join(skipped)}")
    specs = plan(runner, names, profile)
    if jobs > 1:
        return run_parallel(runner, specs, int(jobs), force=force)
    return run_in_order(runner, specs, force=force)


# Notebooks that measure time or memory: they run alone, never beside another job.
JOB_RESULT_TAG = "DPBENCH_JOB_RESULT "


THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


ADDRESS_IN_USE = "Address already in use"


def _gpu_count() -> int:
    if not cuda_available():
        return 0
    import torch

    return torch.cuda.device_count()


def job_env(spec: RunSpec, jobs: int, runtime_dir: str, gpu: int | None = None, cores: int | None = None) -> dict[str, str]:
    """Environment of one isolated job: its own Jupyter runtime folder (connection files),
    its share of the CPU threads (cores / jobs; all cores for an exclusive notebook) and,
    for a CUDA notebook, its own GPU."""
    env = dict(os.environ)
    cores = cores or os.cpu_count() or 1
    threads = cores if spec.exclusive else max(1, cores // jobs)
    for k in THREAD_ENV:
        env[k] = str(threads)
    env["JUPYTER_RUNTIME_DIR"] = runtime_dir
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(gpu)
    return env


def _run_job(runner: Runner, spec: RunSpec, jobs: int, force: bool, gpu: int | None, retries: int = 2) -> RunResult:
    """Run one notebook in a child process (`python -m dpbench.workbench.scheduling --job ...`)."""
    cmd = [sys.executable, "-m", "dpbench.workbench.scheduling", "--job", spec.notebook, spec.profile,
           "--repo", str(runner.repo), "--results", str(runner.results)] + (["--force"] if force else [])
    t0 = time.perf_counter()
    for attempt in range(retries + 1):
        with tempfile.TemporaryDirectory(prefix=f"dpbench-kernel-{spec.notebook}-") as rt:
            proc = subprocess.run(cmd, env=job_env(spec, jobs, rt, gpu), capture_output=True, text=True,
                                  cwd=str(runner.repo))
        line = next((l for l in reversed(proc.stdout.splitlines()) if l.startswith(JOB_RESULT_TAG)), None)
        if line is not None:
            d = json.loads(line[len(JOB_RESULT_TAG):])
            res = RunResult(d["notebook"], d["profile"], d["status"], Path(d["path"]), d["duration_s"], d["error"])
            # A kernel that could not bind its ports never ran the notebook: start it again.
            if res.status == "failed" and ADDRESS_IN_USE in json.dumps(res.error) and attempt < retries:
                continue
            return res
        tail = " ".join((proc.stderr or proc.stdout or "").split())[-1000:]
        if ADDRESS_IN_USE in tail and attempt < retries:
            continue
        err = {"name": "JobCrashed", "message": f"job process exited with code {proc.returncode}: {tail}"}
        return RunResult(spec.notebook, spec.profile, "failed", runner.failed_dir(spec.profile, spec.notebook),
                         time.perf_counter() - t0, err)
    raise AssertionError("unreachable")


def run_parallel(runner: Runner, specs: list[RunSpec], jobs: int, force: bool = False) -> list[RunResult]:
    """Run planned specs with up to `jobs` child processes at once.

    A notebook starts when all its upstreams finished ok (it fails as UpstreamFailed when
    one failed); notebooks whose params say `exclusive: true` start only on an idle machine and keep it to
    themselves. Each job is a separate process with its own Jupyter runtime folder, so
    kernels never share connection files, and a crash is that job's failure only. CUDA
    notebooks get one GPU each (at most one job per GPU). Results come back in plan order.
    """
    names = {s.notebook for s in specs}
    pending = list(specs)
    done: dict[str, RunResult] = {}
    running: dict[Any, tuple[RunSpec, int | None]] = {}
    n_gpu = _gpu_count()
    free_gpus = list(range(n_gpu))
    self_say = runner._say
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        while pending or running:
            started = True
            while started:
                started = False
                exclusive_running = any(s.exclusive for s, _ in running.values())
                for spec in list(pending):
                    ups = [u for u in spec.requires if u in names]
                    bad = [u for u in ups if u in done and not done[u].ok]
                    if bad:
                        done[spec.notebook] = upstream_failed(runner, spec, bad)
                        pending.remove(spec)
                        started = True
                        continue
                    if not all(u in done for u in ups) or len(running) >= jobs or exclusive_running:
                        continue
                    if spec.exclusive and running:
                        continue
                    gpu = None
                    if spec.device.startswith("cuda") and n_gpu:
                        if not free_gpus:
                            continue
                        gpu = free_gpus.pop(0)
                    self_say(f"{spec.notebook} [{spec.profile}]: started (job {len(running) + 1} of {jobs})")
                    fut = pool.submit(_run_job, runner, spec, jobs, force, gpu)
                    running[fut] = (spec, gpu)
                    pending.remove(spec)
                    started = True
                    if spec.exclusive:
                        break
            if not running:
                if pending:  # cannot happen with a topological plan; never spin
                    raise UserError(f"cannot schedule {[s.notebook for s in pending]}: upstreams missing from the plan")
                break
            finished, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for fut in finished:
                spec, gpu = running.pop(fut)
                if gpu is not None:
                    free_gpus.append(gpu)
                try:
                    res = fut.result()
                except Exception as exc:  # the job machinery itself failed: still only this job
                    res = RunResult(spec.notebook, spec.profile, "failed",
                                    runner.failed_dir(spec.profile, spec.notebook), 0.0, error_info(exc))
                done[spec.notebook] = res
                if res.ok:
                    self_say(f"{spec.notebook} [{spec.profile}]: {res.status} ({res.duration_s:.1f} s)")
                else:
                    err = res.error or {}
                    self_say(f"{spec.notebook} [{spec.profile}]: FAILED {err.get('name', '')}: {err.get('message', '')}")
    return [done[s.notebook] for s in specs]


def _job_main(argv: list[str] | None = None) -> int:
    """Child side of `run_parallel`: run one notebook, print its RunResult as one JSON line."""
    ap = argparse.ArgumentParser(prog="python -m dpbench.workbench.scheduling")
    ap.add_argument("--job", nargs=2, metavar=("NOTEBOOK", "PROFILE"), required=True)
    ap.add_argument("--repo", required=True)
    ap.add_argument("--results", required=True)
    ap.add_argument("--force", action="store_true")
    a = ap.parse_args(argv)
    nb, profile = a.job
    runner = Runner(a.repo, a.results, progress=False)
    try:
        spec = resolve(runner.repo, nb, profile)
        preflight(spec)
        res = runner.run(spec, force=a.force)
    except UserError as exc:
        res = RunResult(nb, profile, "failed", runner.failed_dir(profile, nb), 0.0,
                        {"name": "UserError", "message": " ".join(str(exc).split())})
    print(JOB_RESULT_TAG + json.dumps({"notebook": res.notebook, "profile": res.profile, "status": res.status,
                                       "path": str(res.path), "duration_s": res.duration_s, "error": res.error}),
          flush=True)
    return 0


def failure_summary(results: list[RunResult]) -> str:
    """A few lines naming each failed notebook, its error and where its executed copy is."""
    failed = [r for r in results if not r.ok]
    ok = sum(r.status == "ok" for r in results)
    skipped = sum(r.status == "skipped" for r in results)
    lines = [f"{ok} ran ok, {skipped} up to date, {len(failed)} failed"]
    for r in failed:
        err = r.error or {}
        lines.append(f"  FAILED {r.notebook} [{r.profile}]: {err.get('name', '')}: {err.get('message', '')} ({r.path})")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(_job_main())
