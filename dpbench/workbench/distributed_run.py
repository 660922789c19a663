"""What torchrun starts on every rank: `python -m dpbench.workbench.distributed_run CONFIG.yaml`.

`dpbench train CONFIG --nproc N` (see `dpbench.workbench.launch`) runs torchrun, which
starts this module on each rank. `run_config` joins the process group, builds the data set
and model from the config, trains with `dpbench.training.loop.fit(..., device=DataParallel)`
and, on rank 0, writes metrics.csv, ledger.json and manifest.json to `output_dir`. The
training layer (`dpbench.training.distributed`) knows nothing about configs or files.
"""

from __future__ import annotations

import sys
from typing import Any, Sequence

import torch
import torch.distributed as dist

from dpbench import data as dpdata
from dpbench import models
from dpbench.errors import UserError
from dpbench.training.distributed import DataParallel, init_from_env
from dpbench.training.loop import TrainResult, fit, specs_from_flat
from dpbench.workbench.launch import check_config, load_config, write_outputs


def run_config(config: dict[str, Any], dp: DataParallel | None = None) -> TrainResult:
    """Run one training config on this rank (see dpbench.workbench.launch for the keys).

    The config's `fit` mapping holds fit's settings by their flat names
    (`dpbench.training.loop.specs_from_flat`). Rank 0 writes metrics.csv, ledger.json and
    manifest.json (with world_size) to config["output_dir"]. Returns the TrainResult.
    """
    cfg = check_config(config)
    if dp is None:
        dp = init_from_env(backend=cfg.get("backend"), device=cfg["device"])
        dp.noise = cfg["noise"]
    if dp.device is None:
        dp.device = torch.device(cfg["device"])
    torch.manual_seed(cfg["seed"])
    train = dpdata.load_dataset(cfg["dataset"], split="train", **cfg.get("dataset_kwargs", {}))
    test = dpdata.load_dataset(cfg["dataset"], split="test", **cfg.get("dataset_kwargs", {})) if cfg["evaluate"] else None
    c, h, _w = train.input_shape
    model = models.create_model(cfg["model"], num_classes=train.num_classes, in_chans=c, img_size=h,
                                **cfg.get("model_kwargs", {}))
    if cfg["dtype"] == "float64":
        model = model.double()
        # A data set computes .x on demand (read-only): fit takes (x, y) pairs as well.
        train = (train.x.double(), train.y)
        if test is not None:
            test = (test.x.double(), test.y)
    specs = specs_from_flat(dict(cfg["fit"], test_data=test, progress=dp.rank == 0, label=str(cfg["name"])))
    result = fit(model, train, device=dp, **specs)
    if dp.rank == 0:
        write_outputs(cfg, result, world_size=dp.world_size, backend=dist.get_backend())
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m dpbench.workbench.distributed_run CONFIG.yaml` (what torchrun starts on every rank)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 1:
        print("usage: python -m dpbench.workbench.distributed_run CONFIG.yaml (normally started by `dpbench train`)",
              file=sys.stderr)
        return 2
    try:
        run_config(load_config(argv[0]))
    except UserError as exc:
        print(f"dpbench: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
