"""Requirements roll-up (Chapter 5): scores on one stated scale, software gaps from the target
description, the format a hardware feature needs, and the CSV a team takes away."""
from __future__ import annotations

import pandas as pd
import pytest

from cohw_utils.studies.codesign import accelerator, phases, sweep, what_if
from cohw_utils.views import energy_model as energy
from cohw_utils.studies.codesign import requirements as rr
from cohw_utils.spine.analyze import analyze
from cohw_utils.core.errors import CohwError


def _gains() -> pd.DataFrame:
    rows = [("wl:a", "f1", 2.0, 1.0), ("wl:b", "f1", 1.0, 1.0),
            ("wl:a", "f2", 1.25, 0.9), ("wl:b", "f2", 4.0, 0.5),
            ("wl:a", "tiny", 1.01, 1.0), ("wl:b", "tiny", 1.01, 1.0)]
    return pd.DataFrame([{"phase": p, "workload": "wl", "klass": "k", "feature": f, "speedup": s,
                          "energy_ratio": e, "area_added_mm2": 1.0, "binding": "HBM"} for p, f, s, e in rows])


def test_best_features_and_min_gain():
    best = rr.best_features(_gains())
    assert best.loc["wl:a", "best_feature"] == "f1" and best.loc["wl:a", "speedup"] == 2.0
    assert best.loc["wl:b", "best_feature"] == "f2" and best.loc["wl:a", "runner_up"] == "f2 (1.25x)"
    flat = _gains().assign(speedup=1.0)
    assert (rr.best_features(flat)["best_feature"] == "none").all()


def test_rollup_scores_by_hand():
    w = pd.Series({"wl:a": 0.6, "wl:b": 0.4})
    sw = pd.DataFrame([{"phase": "wl:b", "workload": "wl", "requirement": "aten.foo on t", "kind": "operator",
                        "op": "aten.foo", "flops_share": 0.01, "bytes_share": 0.02, "evidence": "e"}])
    out = rr.rollup(rr.best_features(_gains()), _gains(), sw, w).set_index("requirement")
    assert out.loc["f1", "score"] == pytest.approx(0.6 * (1 - 1 / 2.0))
    assert out.loc["f2", "score"] == pytest.approx(0.6 * (1 - 1 / 1.25) + 0.4 * (1 - 1 / 4.0))
    assert out.loc["aten.foo on t", "score"] == pytest.approx(0.4)        # blocks phase b: its whole weight
    assert "tiny" not in out.index                                        # below min_gain, best nowhere
    assert list(out.index) == ["f2", "aten.foo on t", "f1"]               # sorted by score
    assert (out["priority"] == "P0").all()
    assert set(out["kind"]) == {"hardware", "software"}


def test_rollup_tiers_and_weight_normalisation():
    w = pd.Series({"wl:a": 3.0, "wl:b": 2.0})  # not normalised: rollup normalises
    g = _gains()
    g.loc[g.feature == "f1", "speedup"] = [1.05, 1.0]
    out = rr.rollup(rr.best_features(g), g, pd.DataFrame(columns=["phase", "requirement", "kind", "flops_share",
                                                                 "bytes_share", "evidence"]), w)
    out = out.set_index("requirement")
    assert out.loc["f1", "score"] == pytest.approx(0.6 * (1 - 1 / 1.05))
    assert out.loc["f1", "priority"] == "P1"


def test_format_feature_brings_its_software_requirement():
    g = _gains().replace({"feature": {"f2": "int4 weights"}})
    out = rr.rollup(rr.best_features(g), g, pd.DataFrame(columns=["phase", "requirement", "kind", "flops_share",
                                                                 "bytes_share", "evidence"]),
                    pd.Series({"wl:a": 0.6, "wl:b": 0.4}))
    fmt = out[out.requirement.str.startswith("runtime and exporter path for int4")]
    assert len(fmt) == 1 and fmt["kind"].iloc[0] == "software"
    assert fmt["score"].iloc[0] == pytest.approx(out.loc[out.requirement == "int4 weights", "score"].iloc[0])
    if rr.available_sources()["gaps"]:
        assert "MatMulNBits" in fmt["evidence"].iloc[0]


@pytest.fixture(scope="module")
def nerf_phases():
    return [phases.prepare(analyze("nerfacto", ph, rays=256, dtype="fp32")) for ph in ("render", "train_step")]


def test_software_gaps_from_the_target(nerf_phases):
    if not rr.available_sources()["targets"]:
        pytest.skip("cohw_utils.views.target_coverage is not importable")
    sw = rr.software_gaps(nerf_phases)
    render = sw[sw.phase == "nerfacto:render"]
    assert "aten.searchsorted" in set(render["op"])                  # no ONNX SearchSorted operator
    assert not (render["kind"] == "training").any()
    train = sw[sw.phase == "nerfacto:train_step"]
    tr = train[train.kind == "training"]
    assert len(tr) == 1 and 0 < tr["flops_share"].iloc[0] < 1
    assert not train["op"].str.contains("backward").any()            # folded into the training row
    assert rr.SOURCES["targets"] is True


def test_bindings_per_workload_and_csv(nerf_phases, tmp_path):
    ref = accelerator.from_hardware("H100-SXM")
    table = energy.EnergyTable.load("7nm-hbm2e")
    res = sweep.evaluate_designs(ref, nerf_phases, table)
    w = pd.Series({p.label: 0.5 for p in nerf_phases})
    b = rr.bindings(res, w)
    assert set(b.index) == {p.label for p in nerf_phases} and (b["weight"] == 0.5).all()
    assert (b["binding_share"] > 0.5).all()
    gains = what_if.feature_gains(ref, nerf_phases, table=table)
    best = rr.best_features(gains)
    sw = rr.software_gaps(nerf_phases)
    per = rr.per_workload(b, best, sw)
    assert "searchsorted" in per.loc["nerfacto:render", "software_gaps"]
    reqs = rr.rollup(best, gains, sw, w)
    path = rr.write_csv(reqs, tmp_path / "sub" / "requirements.csv")
    back = pd.read_csv(path, index_col="rank")
    assert list(back["requirement"]) == list(reqs["requirement"])
    with pytest.raises(CohwError, match="one design"):
        rr.bindings(sweep.evaluate_designs([ref, ref.replace(name="other")], nerf_phases, table))
