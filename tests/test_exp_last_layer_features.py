"""The last-layer experiment's arms, sweeps, claim rows, tables and backbone choice
(dpbench.experiments.last_layer_features)."""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pandas as pd
import pytest
import torch

from dpbench.errors import UserError
from dpbench.experiments import last_layer_features as llf
from dpbench.training import features as F
from dpbench.training import linear as L
from dpbench.workbench.results import Recorder, check_figure

INF = math.inf


def _fake_table(epsilons, releases, delta=1e-5, conversions=L.CONVERSIONS):
    """Stand-in for linear.noise_multiplier_table: sigma = releases / epsilon (+1 for rdp, +2 for pld)."""
    off = {"classic": 0.0, "rdp": 1.0, "pld": 2.0}
    return [{"solver": s, "releases": k, "epsilon": float(e), "conversion": c, "noise_multiplier": k / e + off[c]}
            for s, k in releases.items() for e in epsilons for c in conversions]


def _runs(acc: dict) -> pd.DataFrame:
    """A sweep frame from {(method, eps, seed): accuracy} (n = 1000, pld)."""
    rows = [{"method": m, "target_epsilon": e, "seed": s, "accuracy": a, "epsilon": e if math.isfinite(e) else INF,
             "n": 1000, "noise_multiplier": 0.0 if not math.isfinite(e) else 1.0 / e, "conversion": "pld"}
            for (m, e, s), a in acc.items()]
    df = pd.DataFrame(rows)
    df["n_epsilon"] = df.n * df.target_epsilon
    return df


class _FakeGrid:
    """Stand-in for linear.run_grid that records its calls and returns one row per (eps, seed)."""

    def __init__(self):
        self.calls = []

    def __call__(self, train, test, num_classes, *, methods, epsilons, seeds, settings, delta, conversion,
                 baseline=True, device=None):
        self.calls.append(dict(methods=list(methods), epsilons=list(epsilons), settings=settings))
        n = int(train[1].shape[0])
        return [{"method": m, "target_epsilon": float(e), "seed": s, "accuracy": 0.5, "epsilon": float(e), "n": n,
                 "noise_multiplier": 2.0, "conversion": conversion}
                for m in methods for e in epsilons for s in seeds]


def _task(n=4000, d=3):
    x = torch.zeros(n, d)
    y = torch.zeros(n, dtype=torch.long)
    return llf.FeatureTask((x, y), (x[:10], y[:10]), 2)


def _recordable(rows, tmp_path):
    """Every row goes through the real Recorder without a schema clash."""
    rec = Recorder(tmp_path, experiment="t", delta=1e-5)
    assert llf.record(rec, rows) == len(rows)
    return rec.frame()


# --------------------------------------------------------------------------- settings


def test_solver_settings_full_batch_and_capped_batch():
    cfg = llf.SolverConfig(sgd_batch_size=0, fc_lam=100.0, clip_norm=0.5)
    st = cfg.settings(4000)
    assert st["dp_sgd"]["batch_size"] is None and st["dp_adam"]["batch_size"] is None
    assert st["dp_fc"]["lam"] == 100.0 and cfg.settings(4000, fc_lam=10.0)["dp_fc"]["lam"] == 10.0
    assert all(s["clip_norm"] == 0.5 for s in st.values())
    assert st["dp_adam"]["lr"] == cfg.adam_lr and st["dp_sgd"]["lr"] == cfg.sgd_lr
    small = llf.SolverConfig(sgd_batch_size=250)
    assert small.settings(4000)["dp_sgd"]["batch_size"] == 250 and small.settings(100)["dp_sgd"]["batch_size"] == 100


def test_releases_count_dp_sgd_only_when_full_batch():
    cfg = llf.SolverConfig(fc_steps=10, newton_steps=3, sgd_steps=30, sgd_batch_size=0)
    assert cfg.releases() == {"least_squares": 3, "dp_fc": 11, "newton": 6, "dp_sgd": 30}
    assert "dp_sgd" not in llf.SolverConfig(sgd_batch_size=250).releases()


# -------------------------------------------------------------------- noise multipliers


def test_noise_rows_tag_only_the_papers_own_setting(monkeypatch):
    monkeypatch.setattr(L, "noise_multiplier_table", _fake_table)
    rows = llf.noise_multiplier_rows([3.0], llf.SolverConfig(), 1e-5)
    assert sorted({r["epsilon"] for r in rows}) == [0.1, 1.0, 3.0, 8.0]  # the papers' epsilons always present
    claims = {r["claim_id"]: r for r in rows if r["claim_id"]}
    assert set(claims) == {f"E-{a}-sigma-eps{e}" for a in ("dpls", "dpfc") for e in ("0.1", "1", "8")}
    assert all(r["conversion"] == "classic" and r["paper"] == llf.PAPER_SIGMA[(r["solver"], r["epsilon"])]
               for r in claims.values())
    assert all(r["paper"] is None for r in rows if not r["claim_id"])
    # DP-FC with another T, or another delta, is not the paper's setting
    other_t = llf.noise_multiplier_rows([], llf.SolverConfig(fc_steps=5), 1e-5)
    assert {r["claim_id"] for r in other_t if r["claim_id"]} == {"E-dpls-sigma-eps0.1", "E-dpls-sigma-eps1",
                                                                 "E-dpls-sigma-eps8"}
    assert not [r for r in llf.noise_multiplier_rows([], llf.SolverConfig(), 1e-6) if r["claim_id"]]


def test_noise_metrics_and_table(monkeypatch, tmp_path):
    monkeypatch.setattr(L, "noise_multiplier_table", _fake_table)
    rows = llf.noise_multiplier_rows([], llf.SolverConfig(), 1e-5)
    metrics = llf.noise_multiplier_metrics(rows)
    assert len(metrics) == len(rows) and all(m["metric"] == "noise_multiplier" for m in metrics)
    tagged = [m for m in metrics if m.get("claim_id")]
    assert len(tagged) == 6 and all(m["comparison"] == "value" and m["exact"] is True for m in tagged)
    assert all("comparison" not in m for m in metrics if not m.get("claim_id"))
    frame = _recordable(metrics, tmp_path)
    assert set(frame.feature_set) == {"none"}
    wide = llf.noise_table(rows, fc_steps=10)
    assert list(wide.columns) == ["classic", "rdp", "pld", "paper (classic)", "classic / paper"]
    ls = wide.loc[("least_squares", 3, 1.0)]
    assert ls["classic"] == pytest.approx(3.0) and ls["paper (classic)"] == 8.5
    assert ls["classic / paper"] == pytest.approx(3.0 / 8.5)
    assert pd.isna(llf.noise_table(rows, fc_steps=5).loc[("dp_fc", 11, 1.0), "paper (classic)"])


def test_classic_sigma_reproduces_papers_least_squares_values():
    """The claim rows' values: classic calibration of DP-LS's 3 releases within 5% of PAPERS.md E."""
    rows = L.noise_multiplier_table([0.1, 1.0, 8.0], {"least_squares": 3}, delta=1e-5, conversions=("classic",))
    for r in rows:
        assert r["noise_multiplier"] == pytest.approx(llf.PAPER_SIGMA[("least_squares", r["epsilon"])], rel=0.05)


# ------------------------------------------------------------------------- claim rows


def _claim_sweep():
    acc = {}
    for s in (0, 1):
        for e, ls, sgd, fc, nt in [(0.1, 0.2, 0.3, 0.25, 0.1), (1.0, 0.5, 0.4, 0.55, 0.3), (8.0, 0.7, 0.6, 0.75, 0.6),
                                   (INF, 0.9, 0.9, 0.9, 0.9)]:
            if math.isfinite(e) or s == 0:  # like run_grid: one non-private run per method
                acc.update({("least_squares", e, s): ls + s / 100, ("dp_sgd", e, s): sgd, ("dp_fc", e, s): fc,
                            ("newton", e, s): nt})
    return _runs(acc)


# ------------------------------------------------------------------- sweeps and tables


def test_sweep_metrics_accounting_rows_only_for_private_runs(tmp_path):
    df = _claim_sweep()
    rows = llf.sweep_metrics(df, "synthetic")
    private = int(np.isfinite(df.target_epsilon).sum())
    assert [r["metric"] for r in rows].count("test_accuracy") == len(df)
    assert [r["metric"] for r in rows].count("accounted_epsilon") == private
    assert [r["metric"] for r in rows].count("noise_multiplier") == private
    only_acc = llf.sweep_metrics(df, "digits:small_cnn:public", accounting=False)
    assert {r["metric"] for r in only_acc} == {"test_accuracy"} and len(only_acc) == len(df)
    frame = _recordable(rows, tmp_path)
    assert set(frame.feature_set) == {"synthetic"}


def test_summary_and_accuracy_table():
    df = _claim_sweep()
    s = llf.summary(df)
    ls1 = s[(s.method == "least_squares") & (s.target_epsilon == 1.0)].iloc[0]
    assert (ls1["min"], ls1["max"]) == pytest.approx((0.5, 0.51)) and ls1["median"] == pytest.approx(0.505)
    assert ls1["n_epsilon"] == 1000.0 and not np.isinf(s.target_epsilon).any()
    t = llf.accuracy_table(df, ["least_squares", "dp_sgd"])
    assert list(t.columns) == ["n*epsilon", "least_squares", "dp_sgd"]
    assert t.loc[8.0, "n*epsilon"] == 8000.0 and t.loc["non-private", "least_squares"] == pytest.approx(0.9)
    assert llf.non_private(df)["newton"] == pytest.approx(0.9)


def test_init_ablation_reuses_the_sweeps_zero_init_runs(monkeypatch, tmp_path):
    grid = _FakeGrid()
    monkeypatch.setattr(L, "run_grid", grid)
    sweep_df = _runs({("dp_sgd", 1.0, 0): 0.7, ("dp_sgd", 1.0, 1): 0.8, ("dp_sgd", INF, 0): 0.9})
    kw = dict(seeds=[0, 1], delta=1e-5, conversion="pld")
    df, rows = llf.init_ablation(_task(), sweep_df, llf.SolverConfig(), epsilons=[1.0], **kw)
    assert len(grid.calls) == 1 and grid.calls[0]["settings"]["dp_sgd"]["init"] == "random"
    assert sorted(df[df.init == "zero"].accuracy) == [0.7, 0.8]  # reused, not rerun
    assert {r["arm"] for r in rows} == {"zero_init", "random_init"} and len(rows) == 4
    assert all(r["claim_id"] == "E-zero-init-helps" and r["ablation"] == "init" for r in rows)
    _recordable(rows, tmp_path)
    # an epsilon the sweep did not run is run for zero init too (only that one)
    grid.calls.clear()
    llf.init_ablation(_task(), sweep_df, llf.SolverConfig(), epsilons=[1.0, 0.1], **kw)
    zero = [c for c in grid.calls if c["settings"]["dp_sgd"]["init"] == "zero"]
    assert len(zero) == 1 and zero[0]["epsilons"] == [0.1]


def test_synthetic_task_is_normalised_on_public_features_only():
    task = llf.synthetic_task(300, 8, 4, n_test=50, n_public=40, separation=0.5, label_noise=0.0, seed=3)
    syn = F.synthetic_features(300, 8, 4, n_test=50, n_public=40, separation=0.5, label_noise=0.0, seed=3)
    norm = F.PublicNormalizer().fit(syn.public.features)
    assert torch.equal(task.train[0], norm.transform(syn.train.features))
    assert torch.equal(task.test[1], syn.test.labels) and task.n_private == 300 and task.num_classes == 4
    assert "n_public=40" in task.notes[1]


def test_sweep_runs_the_solvers_end_to_end(tmp_path):
    task = llf.synthetic_task(400, 8, 3, n_test=200, n_public=100, separation=1.0, label_noise=0.0, seed=0)
    cfg = llf.SolverConfig(sgd_steps=3)
    df = llf.sweep(task, methods=["least_squares", "dp_sgd"], epsilons=[1.0], seeds=[0, 1],
                   settings=cfg.settings(task.n_private), delta=1e-5, conversion="pld")
    assert len(df) == 2 + 4 and (df.n_epsilon == df.n * df.target_epsilon).all()
    private = df[np.isfinite(df.target_epsilon)]
    assert (private.epsilon <= 1.0 + 1e-6).all() and (private.noise_multiplier > 0).all()
    frame = _recordable(llf.sweep_metrics(df, "synthetic"), tmp_path)
    assert len(frame) == 6 + 2 * 4
    for fig in (llf.plot_accuracy_vs_epsilon(df, ["least_squares", "dp_sgd"], "t", delta=1e-5),):
        assert fig.axes


def test_real_features_sweep_tags_the_backbone_and_records_accuracy_rows(tmp_path):
    task = llf.synthetic_task(400, 8, 3, n_test=200, n_public=100, separation=1.0, label_noise=0.0, seed=0)
    task.backbone, task.backbone_source = "small_cnn", "public"
    rec = Recorder(tmp_path, experiment="t", delta=1e-5)
    df, fig = llf.real_features_sweep(task, "digits", rec, methods=["least_squares"], epsilons=[1.0],
                                      settings=llf.SolverConfig().settings(task.n_private), delta=1e-5,
                                      seeds=[0], conversion="pld")
    assert set(df.dataset) == {"digits"} and set(df.backbone_source) == {"public"}
    frame = rec.frame()
    assert len(frame) == len(df) and frame.metric.eq("test_accuracy").any()  # accuracy rows only
    assert fig.axes and not check_figure(fig)


# ------------------------------------------------------------------------------ backbones


def test_find_checkpoint(tmp_path):
    assert llf.find_checkpoint(None, "03 has not run") == (None, "03 has not run")
    path, note = llf.find_checkpoint(tmp_path)
    assert path is None and "no *.safetensors" in note
    (tmp_path / "sub").mkdir()
    for name in ("b.safetensors", "a.safetensors"):
        (tmp_path / "sub" / name).write_bytes(b"")
    path, note = llf.find_checkpoint(tmp_path)
    assert path.name == "a.safetensors" and str(path) in note


def test_select_backbone_falls_back_in_order(tmp_path, monkeypatch):
    from dpbench.data import load_dataset
    from dpbench.models import create_model, save_checkpoint

    monkeypatch.setattr(F, "_hub_reachable", lambda *a, **k: False)
    with pytest.raises(UserError, match="no backbone.*upstream missing"):
        llf.select_backbone("small_cnn", num_classes=10, prefer=("timm", "checkpoint"), checkpoint_note="upstream missing")
    with pytest.raises(UserError, match="unknown backbone option"):
        llf.select_backbone("small_cnn", num_classes=10, prefer=("imagenet",))
    ds = load_dataset("digits", "train")
    pub = (ds.x[:200], ds.y[:200])
    bb = llf.select_backbone("small_cnn", num_classes=10, public=pub, public_epochs=1, checkpoint_dir=tmp_path)
    assert bb.source == "public" and "not a timm model" in bb.note and "no *.safetensors" in bb.note
    assert bb.note.endswith("trained non-privately on 200 public examples")
    # a checkpoint in the upstream folder wins over training; one of another architecture is skipped
    model = create_model("small_cnn", num_classes=10, in_chans=1, img_size=8, zero_head=False)
    save_checkpoint(model, tmp_path / "public.safetensors")
    bb = llf.select_backbone("small_cnn", num_classes=10, public=pub, checkpoint_dir=tmp_path, prefer=("checkpoint",))
    assert bb.source == "checkpoint" and bb.weights_id == F.weights_hash(model)
    other = tmp_path / "other"
    save_checkpoint(create_model("small_cnn", num_classes=5, in_chans=1, img_size=8), other / "five.safetensors")
    wrong = llf.select_backbone("small_cnn", num_classes=10, public=pub, public_epochs=1, checkpoint_dir=other,
                                prefer=("checkpoint", "public"))
    assert wrong.source == "public" and "could not be loaded" in wrong.note


def test_real_feature_task_pixels_normalised_on_the_public_part():
    from dpbench.data import load_dataset, split_public_private

    task = llf.real_feature_task("digits", backbone="pixels", public_fraction=0.2, seed=0)
    ds = load_dataset("digits", "train")
    pub, priv = split_public_private(ds.y, public_fraction=0.2, seed=0)
    norm = F.PublicNormalizer().fit(ds.x[pub].flatten(1))
    assert task.n_private == len(priv) and task.backbone == "pixels"
    assert torch.allclose(task.train[0], norm.transform(ds.x[priv].flatten(1)))
    assert torch.equal(task.train[1], ds.y[priv]) and len(task.test[1]) == len(load_dataset("digits", "test").y)


def test_real_feature_task_caches_backbone_features(tmp_path):
    kw = dict(backbone="small_cnn", prefer=("public",), public_epochs=1, feature_cache=str(tmp_path), seed=0)
    first = llf.real_feature_task("digits", **kw)
    second = llf.real_feature_task("digits", **kw)
    assert "train cache miss" in first.notes[1] and "train cache hit, test cache hit" in second.notes[1]
    assert first.backbone_source == "public" and first.train[0].shape[1] == 64  # pooled to 1x1: 64 features
    assert torch.equal(first.train[0], second.train[0])


# ------------------------------------------------------------------ the regime study (issue 17)

from dpbench.experiments import feature_regime as fr  # noqa: E402
from dpbench.experiments import neps  # noqa: E402
from dpbench.training import linear as L  # noqa: E402


@pytest.fixture(scope="module")
def regime_task():
    return fr.regime_task(2000, 12, 4, n_test=400, n_public=800, n_public_val=300, separation=0.6, label_noise=0.05,
                          seed=3)


@pytest.mark.parametrize("eps", [None, 0.7])
def test_statistics_reuse_reproduces_the_solvers(regime_task, eps):
    t = regime_task
    st = fr.sufficient_stats(t.private, 4, 1.0)
    ref = L.dp_least_squares(t.private.x, t.private.y, 4, epsilon=eps, delta=1e-5, alpha=2.0, lam=1.0, lam_noise=0.5,
                             seed=5)
    w, _ = fr.ls_solve(fr.ls_noisy(st, eps, 1e-5, "pld", 5), alpha=2.0, lam=1.0, lam_noise=0.5)
    assert torch.allclose(w, ref.weights, rtol=1e-5, atol=1e-6)
    ref = L.dp_fc(t.private.x, t.private.y, 4, epsilon=eps, delta=1e-5, lr=0.3, lam=1.0, lam_noise=0.5, steps=3, seed=5)
    (w, _), (w_other, _) = fr.fc_runs(t.private, st, 4, [dict(epsilon=eps, seed=5, lr=0.3, lam=1.0, lam_noise=0.5),
                                                        dict(epsilon=eps, seed=6, lr=0.1, lam=1.0, lam_noise=0.5)],
                                      steps=3, bias=-10.0, delta=1e-5, conversion="pld")
    assert torch.allclose(w, ref.weights, rtol=1e-5, atol=1e-6)  # batching runs changes nothing
    assert not torch.allclose(w_other, ref.weights)
    (w_blocks, _), = fr.fc_runs(t.private, st, 4, [dict(epsilon=eps, seed=5, lr=0.3, lam=1.0, lam_noise=0.5)], steps=3,
                                bias=-10.0, delta=1e-5, conversion="pld", chunk_rows=300)  # 7 blocks of rows
    assert torch.allclose(w_blocks, ref.weights, rtol=1e-5, atol=1e-6)


def test_head_gradient_norms_match_autograd():
    torch.manual_seed(0)
    x, y = torch.randn(7, 5), torch.randint(0, 3, (7,))
    w = torch.randn(3, 5, requires_grad=True)
    b = torch.randn(3, requires_grad=True)
    resid = torch.softmax(x @ w.T + b, 1).detach() - torch.nn.functional.one_hot(y, 3)
    for i in range(7):
        gw, gb = torch.autograd.grad(torch.nn.functional.cross_entropy((x[i] @ w.T + b)[None], y[i:i + 1]), (w, b))
        assert fr.head_gradient_norms(resid[i:i + 1], x[i:i + 1])[0] == pytest.approx(
            float(torch.sqrt(gw.pow(2).sum() + gb.pow(2).sum())), rel=1e-5)


def test_dp_sgd_head_noise_shrinks_with_epsilon(regime_task):
    t = regime_task
    kw = dict(delta=1e-5, batch_fraction=0.5, steps=5, lr=4.0, seed=1)
    clean = fr.dp_sgd_head(t.private, 4, epsilon=None, **kw)[0]
    far = (fr.dp_sgd_head(t.private, 4, epsilon=0.05, **kw)[0] - clean).norm()
    near = (fr.dp_sgd_head(t.private, 4, epsilon=50.0, **kw)[0] - clean).norm()
    assert near < far


def test_logistic_runs_in_one_pass_equal_each_run_alone(regime_task):
    t = regime_task
    runs = [dict(epsilon=e, seed=s, batch_fraction=q, steps=st, lr=lr, optimizer=o)
            for e, s, q, st, lr, o in [(1.0, 0, 0.2, 6, 4.0, "sgd"), (None, 0, 0.2, 6, 0.1, "adam"),
                                       (8.0, 1, 0.2, 6, 4.0, "sgd"), (1.0, 0, None, 3, 8.0, "sgd"),
                                       (2.0, 2, None, 3, 0.1, "adam")]]
    together = fr.logistic_runs(t.private, 4, runs, delta=1e-5, max_columns=10**9, workers=1)
    chunked = fr.logistic_runs(t.private, 4, runs, delta=1e-5, max_columns=1)  # one run per chunk
    for r, (w, b), (w2, b2) in zip(runs, together, chunked):
        w1, b1 = fr.dp_sgd_head(t.private, 4, delta=1e-5, **{k: v for k, v in r.items()})
        assert torch.allclose(w, w1, atol=1e-5) and torch.allclose(b, b1, atol=1e-5)
        assert torch.allclose(w, w2, atol=1e-5)
    assert not torch.allclose(together[0][0], together[2][0])
    # on two Python threads (one torch thread each): the same runs
    threaded = fr.logistic_runs(t.private, 4, runs, delta=1e-5, workers=2)
    for (w, b), (w4, b4) in zip(together, threaded):
        assert torch.allclose(w, w4, atol=1e-5) and torch.allclose(b, b4, atol=1e-5)
    # the per-step sums over blocks of rows (here 7 rows per block) are the same sums
    blocks = fr.logistic_runs(t.private, 4, runs, delta=1e-5, chunk_rows=7)
    assert t.private.n > 7 * 3
    for (w, b), (w3, b3) in zip(together, blocks):
        assert torch.allclose(w, w3, atol=1e-5) and torch.allclose(b, b3, atol=1e-5)


def test_newton_runner_reuses_the_gram_and_matches_the_solver(regime_task):
    t = regime_task
    st = fr.sufficient_stats(t.private, 4, 1.0)
    assert torch.allclose(st.gram, (t.private.x.T @ t.private.x).double(), rtol=1e-4, atol=1e-3)
    cfg = dict(lr=1.0, lam=1.0, lam_noise=0.5)
    (w, _), = fr.newton_runs(t.private, st, 4, [dict(epsilon=3.0, seed=2, **cfg)], steps=2, hessian_fraction=0.5,
                             delta=1e-5, conversion="pld")
    ref = L.dp_newton(t.private.x, t.private.y, 4, epsilon=3.0, delta=1e-5, steps=2, hessian_fraction=0.5, seed=2,
                      shared_first_hessian=True, **cfg)
    assert torch.allclose(w, ref.weights, rtol=1e-4, atol=1e-5)
    runs = [dict(epsilon=e, seed=s, **cfg) for e, s in [(3.0, 2), (1.0, 3), (None, 0)]]
    serial = fr.newton_runs(t.private, st, 4, runs, steps=2, hessian_fraction=0.5, delta=1e-5, conversion="pld",
                            workers=1)
    threaded = fr.newton_runs(t.private, st, 4, runs, steps=2, hessian_fraction=0.5, delta=1e-5, conversion="pld",
                              workers=2)
    assert torch.allclose(serial[0][0], w) and not torch.allclose(serial[0][0], serial[1][0])
    for (w1, _), (w2, _) in zip(serial, threaded):  # two threads: the same runs, up to float rounding
        assert torch.allclose(w1, w2, rtol=1e-4, atol=1e-5)
    runner = fr.Runner(t, t.private, delta=1e-5, conversion="pld", newton_steps=2, hessian_fraction=0.5)
    acc = runner.run("newton", [(None, 0, cfg), (3.0, 2, cfg)], t.test)
    assert len(acc) == 2 and acc[0] > 0.5  # the non-private ceiling learns the task


def test_every_solver_gets_an_equal_tuning_budget():
    grids = fr.default_grids(1000)
    assert fr.equal_budget(grids) == len(grids["least_squares"])
    with pytest.raises(UserError):
        fr.equal_budget({"least_squares": grids["least_squares"], "dp_sgd": grids["dp_sgd"][:-1]})


def test_tuning_uses_only_the_public_draw_at_the_same_n_eps(regime_task):
    t = regime_task
    assert fr.public_epsilon(2.0, t.n, t.public.n) * t.public.n == pytest.approx(2.0 * t.n)
    seen = []

    class Spy(fr.Runner):
        def run(self, method, jobs, evaluate):
            seen.append((self.train is t.public, evaluate is t.public_val, [j[0] for j in jobs]))
            return [0.5 + 0.01 * i for i in range(len(jobs))]

    chosen, rows = fr.tune(Spy(t, t.public, delta=1e-5, conversion="pld"), t, ["least_squares", "dp_fc"], [1.0, None],
                           fr.default_grids(t.n), seed=9)
    assert all(a and b for a, b, _ in seen)
    assert {e for *_, es in seen for e in es} == {fr.public_epsilon(1.0, t.n, t.public.n), None}
    assert chosen[("least_squares", 1.0)] == fr.default_grids(t.n)["least_squares"][-1]


def test_claim_rows_are_keyed_to_n_eps_bands_never_pooled():
    n = 200_000
    eps = neps.epsilon_grid([0.1, 0.5, 2.0, 8.0], n)
    results = [dict(method=m, epsilon=e, seed=s, accuracy=0.5) for m in ("least_squares", "logistic", "dp_fc")
               for e in eps for s in range(2)]
    rows = fr.claim_rows(results + [dict(method="least_squares", epsilon=math.inf, seed=0, accuracy=0.9)], n,
                         setting="t")
    low = [r for r in rows if r["claim_id"] == "E-ls-beats-logistic-low-eps"]
    high = [r for r in rows if r["claim_id"] == "E-ls-beats-logistic"]
    assert {r["epsilon"] for r in low} == set(eps[:2]) and {r["epsilon"] for r in high} == set(eps[2:])
    assert all(neps.band_of(n, r["epsilon"]) == "ImageNet eps < 1" for r in low)
    # within a band only epsilon (and n, fixed) may vary: nothing else that moves with epsilon is a column
    for r in rows:
        assert set(r) <= {"metric", "value", "method", "epsilon", "n", "seed", "claim_id", "unit", "feature_set",
                          "setting"}
    assert not [r for r in rows if r["claim_id"] == "E-newton-beats-ls-high-eps"]  # newton not run: no rows
    newton = [dict(method="newton", epsilon=e, seed=s, accuracy=0.6) for e in eps for s in range(2)]
    rows = fr.claim_rows(results + newton, n, setting="t")
    nt = [r for r in rows if r["claim_id"] == "E-newton-beats-ls-high-eps"]
    assert {r["method"] for r in nt} == {"newton", "least_squares"} and {r["epsilon"] for r in nt} == set(eps[2:])
    for claim, band_eps in (("E-dpfc-best", eps[:2]), ("E-dpfc-best-high-eps", eps[2:])):
        got = [r for r in rows if r["claim_id"] == claim]
        assert {r["method"] for r in got} == {"dp_fc", "least_squares", "newton"}
        assert {r["epsilon"] for r in got} == set(band_eps)


def test_nb05_parameters_cell_parses_and_covers_every_profile_key():
    """papermill drops a profile key it cannot find in the parameters cell (with only a warning),
    e.g. after a comment it fails to parse; every line must parse and every key be a parameter."""
    import logging

    import nbformat
    import yaml
    from papermill.translators import PythonTranslator
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    nb = nbformat.read(root / "notebooks" / "05_last_layer_features.ipynb", as_version=4)
    cell = next(c for c in nb.cells if c.cell_type == "code")
    assert "parameters" in cell.metadata.get("tags", [])
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("papermill").addHandler(handler)
    try:
        names = {p.name for p in PythonTranslator.inspect(cell)}
    finally:
        logging.getLogger("papermill").removeHandler(handler)
    assert not [r.getMessage() for r in records if "Unable to parse" in r.getMessage()]
    for profile in sorted((root / "params" / "05_last_layer_features").glob("*.yaml")):
        keys = set(yaml.safe_load(profile.read_text()) or {})
        assert keys <= names, (profile.name, sorted(keys - names))


def test_batch_ablation_learning_rates_come_from_public_seeds_only(regime_task):
    t = regime_task
    blind = fr.RegimeTask(fr.Split(torch.full_like(t.private.x, float("nan")), t.private.y),
                          fr.Split(torch.full_like(t.test.x, float("nan")), t.test.y), t.public, t.public_val,
                          t.num_classes, t.clip_norm)
    lr_full, lr_small, rows = fr.ablation_lrs(blind, 3.0, small_batch=200, epochs=4, tune_seeds=[7, 8], delta=1e-5,
                                              lrs=[0.5, 8.0, 64.0])
    # no private or test example was touched (they are NaN), and every arm ran every rate on every seed
    assert len(rows) == 2 * 3 * 2 and all(math.isfinite(r["public_val_acc"]) for r in rows)
    assert {r["public_epsilon"] for r in rows} == {fr.public_epsilon(3.0, t.n, t.public.n)}
    for arm, lr in (("full_batch", lr_full), ("small_batch", lr_small)):
        means = {x: np.mean([r["public_val_acc"] for r in rows if r["arm"] == arm and r["lr"] == x]) for x in (0.5, 8.0, 64.0)}
        assert means[lr] == max(means.values())  # the best mean over seeds, not one run
    tagged = fr.ablation_tuning_rows(rows, 3.0)
    assert {r["study"] for r in tagged} == {"ablation_tuning"} and "claim_id" not in tagged[0]


def test_batch_ablation_budgets(regime_task):
    t = regime_task
    rows = fr.batch_ablation(t, epsilon=3.0, small_batch=200, epochs=4, lr_full=8.0, lr_small=8.0, seeds=[0, 1],
                             delta=1e-5)
    steps = {(r["arm"], r["budget"]): r["steps"] for r in rows}
    # fixed epochs: 4 full-batch steps against 4 * 2000 / 200 = 40 sampled steps; fixed steps: 4 each
    assert steps == {("full_batch", "fixed epochs"): 4, ("full_batch", "fixed steps"): 4,
                     ("small_batch", "fixed epochs"): 40, ("small_batch", "fixed steps"): 4}
    tagged = fr.batch_ablation_rows(rows, t.n, 3.0)
    assert {r["budget"] for r in tagged if r.get("claim_id") == "E-full-batch-helps"} == {"fixed epochs"}
