"""The group-wise clipping study's arms, privacy check, statistical rule, tables and claim rows
(dpbench.experiments.groupwise_clipping). Synthetic runs for the tables; one tiny end-to-end
study on the bundled digits for the runs, the ledgers and the memory probe."""

import math
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from conftest import ListRecorder

from dpbench.errors import UserError
from dpbench.experiments import groupwise_clipping as gw
from dpbench.experiments import study_design
from dpbench.models import create_model


def test_parse_arm_settings_and_bad_names():
    assert gw.parse_arm("flat") == {"style": "flat", "adaptive": False, "q": None, "renorm": False, "private": True}
    assert gw.parse_arm("nonprivate")["private"] is False
    ada = gw.parse_arm("layer-adaptive-q0.7-renorm")
    assert (ada["style"], ada["adaptive"], ada["q"], ada["renorm"]) == ("layer", True, 0.7, True)
    assert gw.parse_arm("device-adaptive-q0.5")["renorm"] is False
    for bad in ["global", "layer-adaptive", "layer-adaptive-0.5", "layer-adaptive-qx", "layer-fixed-q0.5",
                "layer-adaptive-q0.5-extra", "nonprivate-adaptive-q0.5"]:
        with pytest.raises(UserError, match="unknown arm"):
            gw.parse_arm(bad)
    arms = ["flat", "layer-adaptive-q0.5", "device-adaptive-q0.5", "layer-adaptive-q0.6-renorm"]
    assert gw.adaptive_arms(arms) == arms[1:]
    assert gw.adaptive_arms(arms, "layer") == ["layer-adaptive-q0.5", "layer-adaptive-q0.6-renorm"]


def test_two_stage_placement_splits_whole_layers_at_half_the_parameters():
    model = create_model("small_cnn", num_classes=10, in_chans=1, img_size=8, width=8, depth=3)
    placement = gw.two_stage_placement(model)
    params = [(n, p.numel()) for n, p in model.named_parameters() if p.requires_grad]
    assert [n for n, _ in params] == list(placement)
    stages = [placement[n] for n, _ in params]
    first_late = stages.index("stage1")
    assert set(stages[:first_late]) == {"stage0"} and set(stages[first_late:]) == {"stage1"}  # module order
    for n, _ in params:  # whole layers: weight and bias share a stage
        assert placement[n] == placement[n.rsplit(".", 1)[0] + ".weight"]
    total = sum(c for _, c in params)
    before = sum(c for n, c in params[:first_late])
    last_layer = params[first_late - 1][0].rsplit(".", 1)[0]
    last_size = sum(c for n, c in params if n.rsplit(".", 1)[0] == last_layer)
    assert before - last_size < total / 2 <= before  # stage0's last layer starts below half, stage1 at or past it
    layers = gw.stage_layers(placement)
    assert layers["stage0"][0] == "blocks.0.conv" and "head" in layers["stage1"]


def test_compare_means_reads_two_standard_errors():
    diff, se, word = gw.compare_means([1.0, 2.0, 3.0], [0.0, 0.0, 0.0])
    assert diff == pytest.approx(2.0) and se == pytest.approx(math.sqrt(1.0 / 3)) and word == "higher"
    assert gw.compare_means([0.0], [0.5]) == (-0.5, 0.0, "lower")  # one seed: no variance, any gap counts
    assert gw.compare_means([0.50, 0.60], [0.55, 0.56])[2] == "within noise"
    diff, se, word = gw.compare_means([0.0, 2.0], [0.0])
    assert se == pytest.approx(1.0) and word == "within noise"  # |1| <= 2 * 1
    with pytest.raises(UserError):
        gw.compare_means([], [1.0])


def _study(**kw):
    x = torch.zeros(4, 1, 8, 8)
    y = torch.zeros(4, dtype=torch.long)
    base = dict(train=(x, y), test=(x, y), model_spec={}, sample_rate=0.5, steps=3, sigmas={2.0: 3.0, 8.0: 1.0},
                delta=1e-5, device=torch.device("cpu"), lr=0.02,
                description={"dataset": "digits", "model_name": "small_cnn", "model_kwargs": {"width": 8},
                             "epochs": 1.0, "batch_size": 2})
    base.update(kw)
    return gw.Study(**base)


def _runs(acc):
    """Synthetic runs: acc[(arm, eps)] = accuracies per seed (wall time 10 * accuracy)."""
    out = []
    for (arm, eps), values in acc.items():
        for s, a in enumerate(values):
            out.append({"arm": arm, "epsilon": eps, "seed": s, "test_acc": a, "wall_time_s": 10 * a,
                        "s_per_step": a / 10})
    return out


ACC = {("nonprivate", None): [0.9, 0.92], ("flat", 8.0): [0.8, 0.82], ("layer", 8.0): [0.6, 0.61],
       ("layer-adaptive-q0.5", 8.0): [0.81, 0.80], ("layer-adaptive-q0.5-renorm", 8.0): [0.5, 0.52],
       ("device", 8.0): [0.7, 0.72], ("flat", 2.0): [0.5, 0.5], ("layer", 2.0): [0.55, 0.56],
       ("layer-adaptive-q0.5", 2.0): [0.2, 0.21], ("layer-adaptive-q0.5-renorm", 2.0): [0.4, 0.4],
       ("device", 2.0): [0.5, 0.5]}
ARMS = ["flat", "layer", "layer-adaptive-q0.5", "layer-adaptive-q0.5-renorm", "device"]


def _private_run(arm, eps, seed, events, spent, adaptive=None):
    return {"arm": arm, "epsilon": eps, "seed": seed, "events": events, "epsilon_spent": spent, "adaptive": adaptive,
            "ledger": f"ledger-{arm}-{eps}"}


def test_privacy_check_refuses_different_ledgers_and_missed_budgets():
    study = _study(sigmas={8.0: 1.0})
    ev = [{"steps": 3, "noise_multiplier": 1.0}]
    good = [_private_run("flat", 8.0, 0, ev, 8.0), _private_run("layer", 8.0, 0, ev, 8.05)]
    df = gw.check_privacy(study, good, ["flat", "layer"], [8.0])
    assert list(df.arm) == ["flat", "layer"] and df["sigma (ledger)"].tolist() == [1.0, 1.0]
    other = [{"steps": 3, "noise_multiplier": 1.1}]
    with pytest.raises(gw.PrivacyCheckError, match="different ledgers"):
        gw.check_privacy(study, good + [_private_run("device", 8.0, 0, other, 8.0)], ["flat"], [8.0])
    with pytest.raises(gw.PrivacyCheckError, match="one event of 3 steps"):
        gw.check_privacy(study, [_private_run("flat", 8.0, 0, [{"steps": 2}], 8.0)], ["flat"], [8.0])
    with pytest.raises(gw.PrivacyCheckError, match="1%"):
        gw.check_privacy(study, [_private_run("flat", 8.0, 0, ev, 8.2)], ["flat"], [8.0])
    ada = SimpleNamespace(sigma_g=1.0, sigma_b=1.0, groups=["a"])
    runs = [_private_run("flat", 8.0, 0, ev, 8.0), _private_run("layer-adaptive-q0.5", 8.0, 0, ev, 8.0, ada)]
    assert gw.representative_ledger(runs, [2.0, 8.0]) == "ledger-layer-adaptive-q0.5-8.0"
    assert gw.representative_ledger(runs[:1], [8.0]) is None


def test_jobs_curves_thresholds_and_speed_summary():
    assert gw.jobs(["flat", "layer"], [2.0, 8.0], [0, 1], True) == [
        ("nonprivate", None, 0), ("nonprivate", None, 1), ("flat", 2.0, 0), ("flat", 2.0, 1), ("layer", 2.0, 0),
        ("layer", 2.0, 1), ("flat", 8.0, 0), ("flat", 8.0, 1), ("layer", 8.0, 0), ("layer", 8.0, 1)]
    assert gw.jobs(["flat"], [8.0], [3], False) == [("flat", 8.0, 3)]
    curves = pd.DataFrame([{"arm": "flat", "epsilon": 8.0, "seed": s, "step": st, "test_acc": 0.1 * st + s,
                            "wall_time_s": st + s} for s in (0, 1) for st in (1, 2)]
                          + [{"arm": "nonprivate", "epsilon": None, "seed": 0, "step": 2, "test_acc": 0.9,
                              "wall_time_s": 1.0}])
    g = gw.mean_curve(curves, "flat", 8.0)
    assert list(g.step) == [1, 2] and list(g.acc) == pytest.approx([0.6, 0.7]) and list(g.t) == [1.5, 2.5]
    assert list(gw.mean_curve(curves, "nonprivate", None).acc) == [0.9]
    traj = pd.DataFrame([{"arm": "a", "epsilon": 8.0, "seed": s, "step": st, "group": gr, "threshold": c}
                         for s, (c0, c1) in enumerate([(3.0, 4.0), (6.0, 8.0)]) for st in (0, 1)
                         for gr, c in (("g0", c0 * (st + 1)), ("g1", c1 * (st + 1)))])
    mean, total = gw.mean_thresholds(traj, "a", 8.0)
    assert list(mean.columns) == ["g0", "g1"] and mean.loc[0, "g0"] == 4.5
    assert list(total) == pytest.approx([(5.0 + 10.0) / 2, (10.0 + 20.0) / 2])  # sqrt(sum C_k^2), then the mean
    assert gw.final_thresholds(traj).loc[("a", 8.0), "g1"] == pytest.approx(12.0)

    runs_df = pd.DataFrame(_runs({("nonprivate", None): [0.2, 0.2], ("flat", 8.0): [0.4, 0.6]}))
    rec = ListRecorder()
    summary = gw.speed_memory_summary(runs_df, [{"arm": "nonprivate", "peak_mem_mb": 2.0},
                                                {"arm": "flat", "peak_mem_mb": float("nan")}], rec)
    assert summary.loc["flat", "time_vs_nonprivate"] == pytest.approx(2.5)
    assert [r["method"] for r in rec.get("seconds_per_step_mean")] == ["nonprivate", "flat"]


@pytest.fixture(scope="module")
def tiny_study():
    torch.set_num_threads(1)
    return gw.make_study(dataset="digits", model_name="small_cnn", model_kwargs={"width": 4, "depth": 2},
                         batch_size=256, epochs=0.5, target_epsilons=[8.0], optimizer="adam", lr=0.02)


def test_make_study_fixes_the_setting(tiny_study):
    s = tiny_study
    assert s.n == 1438 and s.sample_rate == pytest.approx(256 / 1438) and s.steps == round(0.5 / s.sample_rate)
    assert s.num_layers == 5 and s.n_params == sum(p.numel() for p in create_model(**s.model_spec).parameters())
    rows = gw.noise_scale_rows(s, ListRecorder())
    assert rows[0]["sigma*sqrt(d)/B"] == pytest.approx(s.sigmas[8.0] * math.sqrt(s.n_params) / 256)
    assert "K = 5 layers" in gw.study_text(s)
    with pytest.raises(UserError, match="unknown training settings"):
        gw.make_study(dataset="digits", model_name="small_cnn", batch_size=8, epochs=1, target_epsilons=[1.0],
                      learning_rate=0.1)
    with pytest.raises(UserError, match="delta"):
        gw.make_study(dataset="digits", model_name="small_cnn", batch_size=8, epochs=1, target_epsilons=[1.0],
                      delta=0.01)


# ---------------------------------------------------------------------------- the decidable study (issue 16)
@pytest.fixture(scope="module")
def split_study():
    return gw.make_split_study(dataset="digits", model_name="small_cnn", model_kwargs={"width": 4, "depth": 2},
                               batch_size=128, epochs=0.3, epsilon=2.0, validation_fraction=0.2, split_seed=0)


def test_split_study_carves_validation_from_train_and_calibrates_on_the_fit_part(split_study):
    st = split_study
    n_fit, n_val = len(st.train[1]), len(st.validation[1])
    assert n_val == round(0.2 * (n_fit + n_val)) and n_fit + n_val == 1438
    assert st.sample_rate == pytest.approx(128 / n_fit)
    assert st.optimizer == "sgd" and st.momentum == 0.9
    fit_rows = {tuple(r.flatten()[:16].tolist()) for r in st.train[0]}
    assert not any(tuple(r.flatten()[:16].tolist()) in fit_rows for r in st.validation[0][:50])
    rows = gw.regime_rows(st)
    assert rows[0]["paper sigma*sqrt(d)/B"] == gw.PAPER_NOISE_TO_SIGNAL
    assert rows[0]["sigma*sqrt(d)/B"] == pytest.approx(st.sigmas[2.0] * math.sqrt(st.n_params) / 128)


def test_tuning_gives_every_arm_the_same_grid_and_untuned_adaptive_arms_borrow_q05s_rate(split_study, monkeypatch):
    seen = []

    def fake(study, arm, seed, lr, eval_every=None):
        seen.append((arm, lr, seed))
        return SimpleNamespace(final={"test_acc": {"flat": 0.3, "layer": 0.1}.get(arm, 0.03) == lr}), None

    monkeypatch.setattr(gw, "train_tuned", fake)
    arms = ["flat", "layer", "layer-adaptive-q0.5"]
    t = gw.tune_arms(split_study, arms, [0.03, 0.1, 0.3], [7, 8], progress=False)
    assert t.budget() == {a: 6 for a in arms}
    assert {(lr, s) for a, lr, s in seen if a == "flat"} == {(lr, s) for a, lr, s in seen if a == "layer"}
    assert t.chosen == {"flat": 0.3, "layer": 0.1, "layer-adaptive-q0.5": 0.03}
    lrs = gw.arm_learning_rates(t, arms + ["layer-adaptive-q0.7"])
    assert lrs["layer-adaptive-q0.7"] == 0.03
    with pytest.raises(UserError, match="not tuned"):
        gw.arm_learning_rates(t, ["device"])
    sizing = gw.pilot_sizing(t, {"X": ("flat", "layer")}, {"X": 0.5})
    assert sizing[0]["seeds_needed"] >= 6 and sizing[0]["pair"] == "flat - layer"


def test_verdict_runs_read_the_test_set_once_and_tag_preregistered_pairs(split_study):
    test = study_design.HeldOutTest(split_study.test)
    lrs = {"flat": 0.1, "layer": 0.1, "layer-adaptive-q0.5": 0.05}
    rec = ListRecorder()
    jobs_ = [(a, s) for a in lrs for s in (0, 1)]
    runs = gw.run_verdict(split_study, lrs, jobs_, test, rec, eval_every=None, progress=False)
    assert sorted(test.used) == sorted(jobs_)  # one look per run
    for r in runs.runs:
        assert r["lr"] == lrs[r["arm"]] and 0 <= r["test_acc"] <= 1
    with pytest.raises(UserError, match="already used"):
        test.evaluate(torch.nn.Linear(1, 1), ("flat", 0))
    comps = study_design.check_comparisons({gw.CLAIM_FIXED: ["flat", "layer"],
                                            gw.CLAIM_ADAPTIVE: ["layer-adaptive-q0.5", "flat"]}, list(lrs))
    summary = gw.record_comparisons(rec, runs.runs, comps, [0, 1], "tiny")
    rows = rec.get("test_acc_difference", claim_id=gw.CLAIM_ADAPTIVE)
    by = {(r["arm"], r["seed"]): r["test_acc"] for r in runs.runs}
    assert [r["value"] for r in rows] == [pytest.approx(by[("layer-adaptive-q0.5", s)] - by[("flat", s)]) for s in (0, 1)]
    assert all(r["comparison"] == "difference" and r["epsilon"] == 2.0 for r in rows)
    assert {s["claim"] for s in summary} == {gw.CLAIM_FIXED, gw.CLAIM_ADAPTIVE}
    runs_df, _curves, _traj = runs.frames()
    assert "ledger" not in runs_df and len(runs_df) == len(jobs_)


def test_memory_rows_one_per_arm_or_a_failed_row(tiny_study):
    rec = ListRecorder()
    mem = gw.memory_rows(tiny_study, ["nonprivate", "device"], rec, batch_size=64, progress=False)
    assert [m["arm"] for m in mem] == ["nonprivate", "device"]
    for m, r in zip(mem, rec.get("peak_mem_mb")):
        assert (r["status"] == "failed") if math.isnan(m["peak_mem_mb"]) else (m["peak_mem_mb"] >= 0)


def test_wall_time_pairs_tag_adaptive_minus_flat_ghost(monkeypatch):
    rec = ListRecorder()
    df, tables = gw.wall_time_pairs(model_name="small_cnn", img_size=8, batch_size=4, steps=1, repeats=2,
                                    epsilon=2.0, rec=rec, progress=False)
    assert set(df.arm) == {"flat-ghost", "flat-bk", "layer-adaptive-q0.5"} and len(df) == 6
    assert any("second backward" in row["note"] for row in tables["flat-ghost"])
    assert not any("second backward" in row["note"] for row in tables["flat-bk"])
    rows = rec.get("wall_time_difference_s", claim_id=gw.CLAIM_WALL_TIME)
    assert len(rows) == 2 and all(r["epsilon"] == 2.0 for r in rows)


def test_record_comparisons_labels_each_difference_with_its_own_seed():
    # seed 1 lacks the "layer" run: seed 2's difference must still carry seed 2
    runs = [{"arm": a, "seed": s, "epsilon": 2.0, "test_acc": acc}
            for a, s, acc in (("flat", 0, 0.5), ("layer", 0, 0.4), ("flat", 1, 0.9),
                              ("flat", 2, 0.7), ("layer", 2, 0.2))]
    rec = ListRecorder()
    out = gw.record_comparisons(rec, runs, {"X": ("flat", "layer")}, [0, 1, 2], "tiny")
    got = {r["seed"]: r["value"] for r in rec.get("test_acc_difference", claim_id="X")}
    assert got == {0: pytest.approx(0.1), 2: pytest.approx(0.5)}
    assert out[0]["seeds"] == 2 and out[0]["mean"] == pytest.approx(0.3)
