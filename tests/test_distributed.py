"""Data-parallel DP and per-device pipeline clipping on two gloo processes (localhost).

Process start-up dominates the cost, so ONE pair of spawned ranks runs every scenario
(`_worker`) and saves what it saw; the tests compare those files with single-process
references computed here. A separate test runs `dpbench train --nproc 2` end to end through
torchrun.
"""

from __future__ import annotations

import datetime
import os

import pytest
import torch
import torch.nn as nn

from dpbench.clipping import ClippingEngine
from dpbench.training.distributed import DataParallel, free_port, share_seed
from dpbench.training.pipeline import stage_name, stage_placement
from dpbench.training.loop import BatchSpec, ClipSpec, EvalSpec, OptimSpec, PrivacySpec, fit

WORLD = 2
METHODS = ("instantiate", "ghost", "mixed", "bk")
STYLES = ("flat", "layer")
SIGMA, C = 1.5, 2.0
NOISE_NUMEL = 100_000
PIPE_THRESHOLDS = (0.3, 0.5)
PIPE_METHODS = ("bk", "instantiate", "ghost", "mixed")
COMM_FUNCS = ("send", "recv", "isend", "irecv", "all_reduce", "all_gather", "all_gather_into_tensor", "broadcast",
              "reduce", "gather", "scatter", "all_to_all", "reduce_scatter", "reduce_scatter_tensor",
              "all_gather_object", "broadcast_object_list", "send_object_list", "recv_object_list", "barrier")
STEPS, Q, PHYS = 3, 0.3, 4


def _data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (40,), generator=g)
    return x, y


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def _stages():
    torch.manual_seed(0)
    return [nn.Sequential(nn.Linear(6, 5), nn.Tanh()).double(), nn.Sequential(nn.Linear(5, 3)).double()]


def _fit(model, distributed=None, noise_multiplier=0.0, clip_method="auto", clip_style="flat", engine=None):
    x, y = _data()
    return fit(model, (x, y), batching=BatchSpec(steps=STEPS, sample_rate=Q, max_physical_batch=PHYS),
               privacy=PrivacySpec(noise_multiplier=noise_multiplier, delta=1e-3, track_epsilon=False),
               clipping=ClipSpec(method=clip_method, style=clip_style, engine=engine), optim=OptimSpec(lr=0.5),
               evaluation=EvalSpec(progress=False), device=distributed if distributed is not None else "cpu")


class _NoiseEngine:
    """Stand-in engine: one big parameter, sensitivity C (only the noise is looked at)."""

    def __init__(self):
        self.p = nn.Parameter(torch.zeros(NOISE_NUMEL, dtype=torch.float64))
        self.sensitivity = C

    def trainable_parameters(self):
        return [self.p]


def _worker(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from dpbench.training.distributed import DataParallel
    from dpbench.training.pipeline import P2P, PipelineDP

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=90))
    res: dict = {}
    try:
        # 1. data-parallel fit, noise off, every method and two styles
        dp = DataParallel()
        for m in METHODS:
            for s in STYLES:
                r = _fit(_model(), dp, clip_method=m, clip_style=s)
                res[f"dp/{m}/{s}"] = {k: v.clone() for k, v in r.model.state_dict().items()}
        # noise on, rank 0 alone: reproduces the single process's noise stream
        r = _fit(_model(), dp, noise_multiplier=SIGMA)
        res["dp/noisy"] = r.model.state_dict()
        res["ledger"] = r.ledger.to_dict()
        res["config_world"] = r.config["world_size"]

        # 2. the summed noise, both modes; the local shares are captured before the sum
        for mode in ("rank0", "shares"):
            d = DataParallel(noise=mode)
            shares = []
            orig = d.all_reduce_tensors
            d.all_reduce_tensors = lambda ts, orig=orig: (shares.extend(t.clone() for t in ts), orig(ts))[1]
            eng = _NoiseEngine()
            opt = d.optimizer(torch.optim.SGD([eng.p], lr=0.0), eng, SIGMA, 1.0, seed=5)
            opt.zero_grad()
            opt.add_noise()
            res[f"noise/{mode}"] = {"sum": eng.p.grad.clone(), "share": shares[0],
                                    "share_std": opt.noise_share_std}

        # 3. pipeline: stage k on rank k, per-device clipping, noise off, logged transport
        x, y = _data()
        for m in PIPE_METHODS:
            tr = P2P()
            pipe = PipelineDP(_stages(), PIPE_THRESHOLDS, noise_multiplier=0.0, expected_batch_size=Q * len(y),
                              example_input=x, lr=0.5, method=m, transport=tr)
            calls = []  # every torch.distributed communication call made while training
            saved = {f: getattr(dist, f) for f in COMM_FUNCS if hasattr(dist, f)}
            for f, fn in saved.items():
                setattr(dist, f, lambda *a, _f=f, _fn=fn, **k: (calls.append(_f), _fn(*a, **k))[1])
            try:
                pipe.train(x, y, sample_rate=Q, steps=STEPS, seed=0, max_physical_batch=PHYS)
            finally:
                for f, fn in saved.items():
                    setattr(dist, f, fn)
            res[f"pipe/{m}/calls"] = calls
            res[f"pipe/{m}"] = {k: v.clone() for k, v in pipe.module.state_dict().items()}
            res[f"pipe/{m}/log"] = tr.log
            pipe.remove()
        pipe = PipelineDP(_stages(), PIPE_THRESHOLDS, noise_multiplier=SIGMA, expected_batch_size=10.0,
                          example_input=x)
        res["pipe/noise_std"] = pipe.optimizer.noise_std
        res["pipe/seed"] = pipe.optimizer.seed
        res["pipe/default_device"] = str(pipe.device)  # where the stage lives, not a hard-coded "cpu"
        pipe.remove()
        # 4. under NCCL (mocked: only the backend name), a stage on the CPU is refused up front
        real_backend = dist.get_backend
        dist.get_backend = lambda group=None: "nccl"
        try:
            PipelineDP(_stages(), PIPE_THRESHOLDS, noise_multiplier=SIGMA, expected_batch_size=10.0, example_input=x)
            res["pipe/nccl_cpu"] = "accepted"
        except Exception as exc:  # noqa: BLE001 - the message is what the test checks
            res["pipe/nccl_cpu"] = f"{type(exc).__name__}: {exc}"
        finally:
            dist.get_backend = real_backend
    finally:
        torch.save(res, os.path.join(out, f"rank{rank}.pt"))
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Run `_worker` on two gloo ranks once; return each rank's saved results."""
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("dist")
    mp.spawn(_worker, args=(free_port(), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _close(a: dict, b: dict, tol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=tol, rtol=0), (k, (a[k] - b[k]).abs().max())


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("style", STYLES)
def test_data_parallel_equals_one_process(ranks, method, style):
    ref = _fit(_model(), clip_method=method, clip_style=style).model.state_dict()
    start = _model().state_dict()
    assert any((ref[k] - start[k]).abs().max() > 1e-3 for k in ref)  # training moved the weights
    for r in range(WORLD):  # every rank holds the same, single-process weights
        _close(ranks[r][f"dp/{method}/{style}"], ref)


def test_data_parallel_with_rank0_noise_reproduces_one_process(ranks):
    ref = _fit(_model(), noise_multiplier=SIGMA).model.state_dict()
    noiseless = _fit(_model()).model.state_dict()
    assert any((ref[k] - noiseless[k]).abs().max() > 1e-2 for k in ref)
    for r in range(WORLD):
        _close(ranks[r]["dp/noisy"], ref)


def test_ledger_and_config_record_world_size(ranks):
    assert ranks[0]["ledger"]["world_size"] == WORLD
    assert ranks[0]["config_world"] == WORLD
    # one accounted step per logical batch at the global rate q (not q / world_size)
    assert ranks[0]["ledger"]["events"] == [{"type": "dpsgd", "noise_multiplier": SIGMA, "sample_rate": Q, "steps": STEPS}]


@pytest.mark.parametrize("mode", ["rank0", "shares"])
def test_noise_variance_sums_to_sigma2_c2(ranks, mode):
    target = (SIGMA * C) ** 2
    a, b = ranks[0][f"noise/{mode}"], ranks[1][f"noise/{mode}"]
    assert torch.equal(a["sum"], b["sum"])  # every rank steps with the same noisy gradient
    var = float(a["sum"].var())
    assert abs(var / target - 1) < 0.03, (var, target)  # world_size * target would be 2x
    if mode == "rank0":
        assert float(b["share"].abs().max()) == 0.0 and a["share_std"] == SIGMA * C
    else:
        for s in (a, b):
            assert abs(float(s["share"].var()) / (target / WORLD) - 1) < 0.03
            assert s["share_std"] == pytest.approx(SIGMA * C / WORLD ** 0.5)
        corr = float(torch.corrcoef(torch.stack([a["share"], b["share"]]))[0, 1])
        assert abs(corr) < 0.02  # distinct seeds: independent shares


def test_rank0_noise_is_the_single_process_stream(ranks):
    from dpbench.training.optimizer import DPOptimizer

    eng = _NoiseEngine()
    opt = DPOptimizer(torch.optim.SGD([eng.p], lr=0.0), eng, SIGMA, 1.0, seed=5)
    opt.zero_grad()
    opt.add_noise()
    assert torch.allclose(ranks[0]["noise/rank0"]["sum"], eng.p.grad, atol=1e-12)
    assert share_seed(5, 0) != share_seed(5, 1)


def _pipeline_reference(method):
    x, y = _data()
    stages = _stages()
    model = nn.Sequential(*stages)
    placement = stage_placement(stages)
    thresholds = {stage_name(k): c for k, c in enumerate(PIPE_THRESHOLDS)}
    eng = ClippingEngine(model, method=method, style="device", placement=placement, thresholds=thresholds)
    r = _fit(model, engine=eng)
    eng.remove()
    return r.model


@pytest.mark.parametrize("method", PIPE_METHODS)
def test_pipeline_per_device_clipping_equals_single_process_device_style(ranks, method):
    ref = _pipeline_reference(method)
    start = nn.Sequential(*_stages())
    for k in range(WORLD):
        got = ranks[k][f"pipe/{method}"]
        want = {n: p.detach() for n, p in ref[k].state_dict().items()}
        _close(got, want)
        moved = max(float((want[n] - start[k].state_dict()[n]).abs().max()) for n in want)
        assert moved > 1e-3


def test_pipeline_sends_only_activations_and_their_gradients(ranks):
    from dpbench.training.sampling import PoissonSampler, split_physical

    x, y = _data()
    chunks = [len(c) for b in PoissonSampler(len(y), Q, STEPS, seed=0) for c in split_physical(b, PHYS)]
    assert chunks  # something was sent
    for m in PIPE_METHODS:
        log0, log1 = ranks[0][f"pipe/{m}/log"], ranks[1][f"pipe/{m}/log"]
        # rank 0: per chunk, send the (b, 5) activation, receive its (b, 5) gradient
        assert log0 == [e for b in chunks for e in (("send", 1, (b, 5), torch.float64),
                                                     ("recv", 1, (b, 5), torch.float64))]
        assert log1 == [e for b in chunks for e in (("recv", 0, (b, 5), torch.float64),
                                                     ("send", 0, (b, 5), torch.float64))]
        # and nothing else went over the wire: one send and one recv per chunk, no collective
        for k in range(WORLD):
            assert sorted(ranks[k][f"pipe/{m}/calls"]) == ["recv"] * len(chunks) + ["send"] * len(chunks)


def test_pipeline_noise_uses_total_sensitivity(ranks):
    c_total = (PIPE_THRESHOLDS[0] ** 2 + PIPE_THRESHOLDS[1] ** 2) ** 0.5
    for k in range(WORLD):
        assert ranks[k]["pipe/noise_std"] == pytest.approx(SIGMA * c_total)  # not SIGMA * C_k
    assert ranks[0]["pipe/seed"] != ranks[1]["pipe/seed"]  # independent noise per stage


def test_dpbench_train_nproc_2_end_to_end(tmp_path, monkeypatch):
    """`dpbench train CONFIG --nproc 2` through torchrun on gloo: metrics and manifest."""
    import json

    import yaml

    out = tmp_path / "out"
    cfg = {"name": "tiny", "output_dir": str(out), "dataset": "synthetic",
           "dataset_kwargs": {"n": 64, "image_shape": [1, 4, 4], "num_classes": 3, "seed": 0},
           "model": "mlp", "evaluate": True, "dtype": "float64",  # float64 data sets used to crash here
           "fit": {"steps": 2, "expected_batch_size": 16, "noise_multiplier": 1.0, "delta": 1e-3}}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    from dpbench.workbench.cli import main

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert main(["train", str(path), "--nproc", "2"]) == 0  # in-process CLI; torchrun underneath
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["backend"] == "gloo"
    assert manifest["ledger"]["world_size"] == 2
    from dpbench.workbench.results import load_metrics

    df = load_metrics(out)
    assert set(df["world_size"]) == {2}
    assert float(df.loc[df.metric == "epsilon", "value"].iloc[0]) > 0


def test_launcher_rejects_bad_config(tmp_path):
    from dpbench.errors import UserError
    from dpbench.workbench.launch import check_config, torchrun_command

    with pytest.raises(UserError, match="unknown config keys"):
        check_config({"modle": "mlp"})
    with pytest.raises(UserError, match="set by the launcher"):
        check_config({"fit": {"distributed": 1}})
    cmd = torchrun_command("c.yaml", 4)
    assert cmd[1:] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4",
                       "-m", "dpbench.workbench.distributed_run", "c.yaml"]
    with pytest.raises(UserError, match="set by the launcher"):
        check_config({"fit": {"hooks": []}})


class _FakeDistributed(DataParallel):
    """A DataParallel that never touches torch.distributed (only the refusals are exercised)."""

    def __init__(self):
        self.rank, self.world_size, self.device, self.noise, self.group = 0, 2, None, "rank0", None


def test_hooks_plans_and_nonprivate_runs_are_refused_under_data_parallel():
    """Adaptive thresholds from one rank's norms would diverge across ranks: refuse them."""
    from dpbench.errors import UserError
    from dpbench.training.mixing import MixingPlan, make_schedule

    x, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
    batching = BatchSpec(steps=1, expected_batch_size=4)
    with pytest.raises(UserError, match="hooks"):
        fit(torch.nn.Linear(4, 2), (x, y), batching=batching, privacy=PrivacySpec(noise_multiplier=1.0),
            evaluation=EvalSpec(progress=False), device=_FakeDistributed(), hooks=[lambda info: None])
    with pytest.raises(UserError, match="data-parallel"):
        fit(torch.nn.Linear(4, 2), (x, y), batching=batching, privacy=None, device=_FakeDistributed())
    with pytest.raises(UserError, match="data-parallel"):
        fit(torch.nn.Linear(4, 2), (x, y), batching=BatchSpec(expected_batch_size=4),
            privacy=PrivacySpec(noise_multiplier=1.0), device=_FakeDistributed(),
            plan=MixingPlan(make_schedule("only_private", 2)))


def test_the_training_layer_has_no_torchrun_entry():
    import dpbench.training.distributed as mod

    assert not hasattr(mod, "run_config") and not hasattr(mod, "main")


def test_pipeline_device_follows_the_stage_and_nccl_needs_a_gpu(ranks):
    for r in range(WORLD):
        assert ranks[r]["pipe/default_device"] == "cpu"  # the stages live on the CPU here
        assert ranks[r]["pipe/nccl_cpu"].startswith("UserError") and "NCCL" in ranks[r]["pipe/nccl_cpu"]
