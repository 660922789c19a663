"""n·eps keying (dpbench.experiments.neps): bands agree with the claims' setting_keys."""

import csv
from pathlib import Path

import pytest

from dpbench.errors import UserError
from dpbench.experiments import neps
from dpbench.workbench import verdicts

CSV = Path(__file__).resolve().parents[1] / "references" / "paper_values.csv"


def test_linear_keying_round_trip():
    n = 200_000
    for e in (0.1, 1.0, 8.0):
        ours = neps.epsilon_for_imagenet(e, n)
        assert neps.imagenet_epsilon(n, ours) == pytest.approx(e)
        assert neps.n_epsilon(n, ours) == pytest.approx(e * neps.IMAGENET_N)
    assert neps.imagenet_epsilon(neps.IMAGENET_N, 3.0) == pytest.approx(3.0)


def test_grid_never_falls_below_a_closed_band_edge():
    n = 200_000
    grid = neps.epsilon_grid([1.0, 10.0], n)
    assert neps.n_epsilon(n, grid[0]) >= neps.IMAGENET_N  # rounded up, so eps_IN = 1 is inside [1, 10]
    assert neps.band_of(n, grid[0]) == "ImageNet eps in [1, 10]"
    assert neps.band_of(n, neps.epsilon_grid([0.1], n)[0]) == "ImageNet eps < 1"
    assert neps.band_of(n, neps.epsilon_for_imagenet(20.0, n)) == ""


def test_bands_match_the_claim_rows_setting_keys():
    rows = {r["claim_id"]: r for r in csv.DictReader(CSV.open())}
    keyed = [r for r in rows.values() if r["claim_id"].startswith("E-") and "n*epsilon" in r["setting_keys"]]
    assert keyed, "the E claims are keyed to n*epsilon"
    n = 200_000
    for r in keyed:
        (conds,) = verdicts.parse_setting(r["setting_keys"])
        names = {neps.band_setting(b) for b in neps.BANDS}
        assert r["setting_keys"].replace(" ", "") in {s.replace(" ", "") for s in names}
        for e_in in (0.03, 0.1, 0.5, 0.99, 1.0, 2.0, 8.0, 10.0, 12.0):
            eps = neps.epsilon_grid([e_in], n)[0]
            row = {"n": n, "epsilon": eps}
            inside = all(c.holds(c.value_of(row)) for c in conds)
            assert inside == (neps.band_setting(neps.band_of(n, eps)) == r["setting_keys"]
                              if neps.band_of(n, eps) else False)


def test_noise_matched_epsilon_is_linear_at_small_eps_and_checks_input():
    n = 200_000
    small = neps.noise_matched_imagenet_epsilon(n, 0.5, 1e-6, delta_ref=1e-6)
    assert small == pytest.approx(neps.imagenet_epsilon(n, 0.5), rel=0.15)
    # at large eps sigma falls slower than 1/eps, so our noise is relatively larger than the linear
    # keying says: the noise-matched ImageNet epsilon is below the linear one
    assert neps.noise_matched_imagenet_epsilon(n, 50.0, 1e-6, delta_ref=1e-6) < 0.8 * neps.imagenet_epsilon(n, 50.0)
    with pytest.raises(UserError):
        neps.n_epsilon(0, 1.0)
