"""Launching data-parallel DP training: `dpbench train CONFIG.yaml --nproc N` and notebooks.

`dpbench train` starts torchrun underneath:

    python -m torch.distributed.run --standalone --nproc-per-node N -m dpbench.workbench.distributed_run CONFIG.yaml

and every rank runs `dpbench.workbench.distributed_run.run_config`: data set and model from the config,
`dpbench.training.loop.fit(..., device=DataParallel)`, rank 0 writes `metrics.csv`,
`ledger.json` and `manifest.json` (world size, backend, resolved config, ledger,
environment) to `output_dir`.

A notebook launches a multi-process run and reads its metrics back with

    from dpbench.workbench.launch import run_distributed
    df = run_distributed({"dataset": "digits", "model": "mlp",
                          "fit": {"steps": 50, "expected_batch_size": 64, "noise_multiplier": 1.0}},
                         nproc=2)

Config keys (YAML mapping): dataset (default "digits"), dataset_kwargs, model (default
"mlp"), model_kwargs, device ("cpu" -> gloo; "cuda" -> NCCL, one GPU per rank), dtype
("float32" | "float64"), seed, noise ("rank0" | "shares"), backend (None = automatic),
evaluate (bool), output_dir, name (the run label), and `fit`: `dpbench.training.loop.fit`'s
settings by their flat names (`dpbench.training.loop.specs_from_flat`: steps or epochs,
sample_rate or expected_batch_size, noise_multiplier or target_epsilon, max_grad_norm,
clip_method, clip_style, lr, optimizer, max_physical_batch, delta, ...).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from dpbench.atomic import write_json_atomic
from dpbench.errors import UserError
from dpbench.workbench import provenance
from dpbench.workbench.results import Recorder, load_metrics

DEFAULTS: dict[str, Any] = {
    "name": "train", "dataset": "digits", "dataset_kwargs": {}, "model": "mlp", "model_kwargs": {},
    "device": "cpu", "dtype": "float32", "seed": 0, "noise": "rank0", "backend": None, "evaluate": True,
    "output_dir": None, "fit": {},
}
# fit() arguments the launcher sets itself.
_RESERVED_FIT = ("distributed", "device", "progress", "model", "train_data", "test_data", "recorder", "engine",
                 "ledger", "callbacks", "hooks", "plan", "label", "private", "batching", "privacy", "clipping",
                 "optim", "evaluation")


def load_config(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML training config (a mapping)."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file {str(p)!r} not found; pass the path of a YAML training config")
    try:
        cfg = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"cannot parse {p}: {' '.join(str(exc).split())}") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{p} must hold a YAML mapping of config keys")
    return cfg


def check_config(config: dict[str, Any]) -> dict[str, Any]:
    """Defaults filled in and keys checked; raises UserError naming a bad key."""
    unknown = sorted(set(config) - set(DEFAULTS))
    if unknown:
        raise UserError(f"unknown config keys {unknown}; allowed: {sorted(DEFAULTS)} (fit arguments go under `fit:`)")
    cfg = {k: (dict(v) if isinstance(v, dict) else v) for k, v in DEFAULTS.items()}
    cfg.update({k: v for k, v in config.items() if v is not None or k in ("backend", "output_dir")})
    if not isinstance(cfg["fit"], dict):
        raise UserError("config key `fit` must be a mapping of dpbench.training.loop.fit arguments")
    bad = [k for k in cfg["fit"] if k in _RESERVED_FIT]
    if bad:
        raise UserError(f"fit keys {bad} are set by the launcher; use the top-level config keys instead")
    if cfg["dtype"] not in ("float32", "float64"):
        raise UserError(f"dtype must be float32 or float64, got {cfg['dtype']!r}")
    if cfg["noise"] not in ("rank0", "shares"):
        raise UserError(f"noise must be 'rank0' or 'shares', got {cfg['noise']!r}")
    cfg["fit"].setdefault("seed", cfg["seed"])
    if cfg["output_dir"] is None:
        cfg["output_dir"] = str(Path("results") / "train" / str(cfg["name"]))
    return cfg


def write_outputs(cfg: dict[str, Any], result: Any, *, world_size: int, backend: str) -> Path:
    """metrics.csv, ledger.json and manifest.json of one distributed run (rank 0 only)."""
    out = Path(cfg["output_dir"])
    out.mkdir(parents=True, exist_ok=True)
    rec = Recorder(out, experiment=str(cfg["name"]), delta=result.delta)
    result.record(rec, method=str(cfg["fit"].get("clip_method", "auto")), seed=cfg["fit"]["seed"],
                  world_size=world_size)
    rec.add("epsilon", result.final["epsilon"], method=str(cfg["fit"].get("clip_method", "auto")),
            epsilon=result.final["epsilon"], seed=cfg["fit"]["seed"], step=result.steps, world_size=world_size)
    rec.save()
    ledger = result.ledger.to_dict() if result.ledger is not None else None
    if ledger is not None:
        write_json_atomic(out / "ledger.json", ledger)
    manifest = {
        "kind": "dpbench train", "status": "ok", "name": cfg["name"], "world_size": world_size, "backend": backend,
        "noise": cfg["noise"], "config": cfg, "final": result.final, "ledger": ledger,
        "environment": provenance.environment(), "device": provenance.device_info(str(cfg["device"])),
        "finished": provenance.now_iso(),
    }
    write_json_atomic(out / "manifest.json", manifest)
    return out


def torchrun_command(config_path: str | os.PathLike, nproc: int, extra: list[str] | None = None) -> list[str]:
    """The torchrun command line `dpbench train` runs (one node, `nproc` processes)."""
    if int(nproc) != nproc or nproc < 1:
        raise UserError(f"--nproc must be a positive integer, got {nproc!r}")
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(int(nproc)),
            *(extra or []), "-m", "dpbench.workbench.distributed_run", str(config_path)]


def launch(config_path: str | os.PathLike, nproc: int, *, timeout: float | None = None,
           capture: bool = False) -> subprocess.CompletedProcess:
    """Run torchrun on a config file; raises UserError when a rank fails."""
    cfg = check_config(load_config(config_path))  # fail here, not in N processes
    cmd = torchrun_command(config_path, nproc)
    env = dict(os.environ)
    if str(cfg["device"]).startswith("cpu"):
        # Ranks share the cores: without this each would start one thread per core.
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // int(nproc))))
    proc = subprocess.run(cmd, env=env, timeout=timeout, text=True,
                          stdout=subprocess.PIPE if capture else None, stderr=subprocess.PIPE if capture else None)
    if proc.returncode != 0:
        tail = (proc.stderr or "")[-2000:] if capture else ""
        raise UserError(f"distributed training failed (torchrun exit {proc.returncode}); see the ranks' errors above"
                        + (f": {' '.join(tail.split())[-600:]}" if tail else ""))
    return proc


def run_distributed(config: dict[str, Any], nproc: int = 2, *, timeout: float | None = None):
    """Launch `config` on `nproc` local processes and return its metrics as a DataFrame.

    The config is written to a temporary YAML file; `output_dir` defaults to a fresh
    temporary folder (kept: the DataFrame's `attrs["output_dir"]` names it, with
    manifest.json and ledger.json beside metrics.csv).
    """
    import yaml

    cfg = dict(config)
    if not cfg.get("output_dir"):
        cfg["output_dir"] = tempfile.mkdtemp(prefix="dpbench-train-")
    check_config(cfg)
    with tempfile.TemporaryDirectory(prefix="dpbench-cfg-") as tmp:
        path = Path(tmp) / "config.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        launch(path, nproc, timeout=timeout, capture=True)
    df = load_metrics(Path(cfg["output_dir"]) / "metrics.csv")
    df.attrs["output_dir"] = str(cfg["output_dir"])
    return df


def add_cli_arguments(parser) -> None:
    """Arguments of `dpbench train`."""
    parser.add_argument("config", help="YAML training config (see dpbench.workbench.launch)")
    parser.add_argument("--nproc", type=int, default=1, help="processes on this machine (one per GPU with device: cuda)")


def cli(args) -> int:
    """`dpbench train CONFIG --nproc N`: returns 0 on success (UserError otherwise)."""
    launch(args.config, args.nproc)
    cfg = check_config(load_config(args.config))
    print(Path(cfg["output_dir"]) / "metrics.csv")
    return 0
