"""Few-shot protocol: episodes by label name, one label set for the mean, the first-patients support.

References: hand-computed supports, scikit-learn (LogisticRegression, roc_auc_score) and numpy.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from cli import probes
from featcache.errors import FeatcacheError
from featcache.store.feature_store import ArraySpec, FeatureStore
from featcache.store.manifest import read_manifest, write_manifest
from probes.data import load_probe_data
from probes.episodes import first_patient_episodes
from probes.estimators.fewshot import fewshot_scores, sample_episodes
from probes.fewshot_run import auroc_many, fewshot_notes, run_fewshot, summarize_fewshot


def _store(tmp_path, columns: dict, X: np.ndarray, patients, ids=None):
    n = len(X)
    cols = {
        "path": [f"{i}.png" for i in range(n)],
        "id": list(ids) if ids is not None else [f"img{i}" for i in range(n)],
        "patient_id": list(patients),
        **columns,
    }
    manifest = read_manifest(write_manifest(tmp_path / "m.csv", cols), check_files=False)
    fs = FeatureStore(tmp_path / "cache", mode="a").create_set(
        "toy/m/32", manifest, {"cls": ArraySpec((X.shape[1],))}, {"config": {}, "model": "m", "res": 32}
    )
    fs.write_shard(0, {"cls": X}, {})
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def three_labels(tmp_path_factory):
    """60 train/val patients (2 images each) and 20 test patients; labels a, b, c and 'rare' with
    3 positive train+val patients."""
    rng = np.random.default_rng(0)
    n_pat = 80
    pid = np.repeat([f"p{i:03d}" for i in range(n_pat)], 2)
    split = np.repeat(
        np.where(np.arange(n_pat) < 50, "train", np.where(np.arange(n_pat) < 60, "val", "test")), 2
    )
    Yp = (rng.random((n_pat, 3)) < 0.5).astype(float)
    Yp[[0, 60], :] = 1
    Yp[[1, 61], :] = 0
    rare = np.zeros(n_pat)
    rare[[3, 7, 55, 62, 63]] = 1  # 3 train+val patients, 2 test patients
    Y = np.repeat(np.column_stack([Yp, rare]), 2, axis=0)
    X = rng.normal(size=(len(pid), 8)).astype(np.float32)
    X[:, :4] += 1.5 * Y
    cols = {"split": split, "a": Y[:, 0], "b": Y[:, 1], "c": Y[:, 2], "rare": Y[:, 3]}
    return _store(tmp_path_factory.mktemp("three"), cols, X, pid)


def _episodes(path):
    return json.loads(path.read_text())["runs"][0]["episodes"]


def test_an_episode_depends_only_on_its_label_name_shots_and_seed(three_labels, tmp_path):
    alone = run_fewshot(three_labels, shots=[1, 3], seeds=3, labels=["c"], episodes_out=tmp_path / "1.json")
    among = run_fewshot(
        three_labels, shots=[1, 3], seeds=3, labels=["b", "a", "c"], episodes_out=tmp_path / "2.json"
    )
    c_alone = {(e["shots"], e["seed"]): e for e in _episodes(tmp_path / "1.json")}
    c_among = {(e["shots"], e["seed"]): e for e in _episodes(tmp_path / "2.json") if e["label"] == "c"}
    assert len(c_alone) == 6 and c_alone.keys() == c_among.keys()
    for key, e in c_alone.items():
        assert e["support_ids"] == c_among[key]["support_ids"] and e["targets"] == c_among[key]["targets"]
    # the same support and the same pool give the same test AUROC
    value = {(r["shots"], r["seed"]): r["value"] for r in among if r["label"] == "c"}
    assert all(value[(r["shots"], r["seed"])] == r["value"] for r in alone if r["label"] == "c")
    # the label's column position does not matter either: c is column 2 of the pool, column 0 alone
    d = load_probe_data(three_labels, val_fraction=0)
    pids = np.concatenate([d.train.patients, d.val.patients])
    ids = np.concatenate([d.train.ids, d.val.ids])
    Y = np.concatenate([d.train.y, d.val.y])
    for cols, names, j in (([2], ["c"], 0), ([0, 1, 2, 3], ["a", "b", "c", "rare"], 2)):
        eps = sample_episodes(pids, Y[:, cols], shots=3, seeds=[2], labels=[j], label_names=names)
        assert ids[eps[0].support].tolist() == c_alone[(3, 2)]["support_ids"]


def test_the_mean_averages_one_named_label_set_at_every_shots(three_labels):
    rows = run_fewshot(three_labels, shots=[1, 2, 3, 4, 5], seeds=2, head="prototype")
    means = [r for r in rows if r["label"] == "mean"]
    assert len(means) == 10
    assert {tuple(r["params"]["labels_in_mean"]) for r in means} == {("a", "b", "c")}
    assert means[0]["params"]["labels_left_out_of_mean"] == {"rare": "at most 3 shots"}
    for m in means:
        per_label = [
            r["value"]
            for r in rows
            if (r["shots"], r["seed"]) == (m["shots"], m["seed"]) and r["label"] in "abc"
        ]
        assert m["value"] == pytest.approx(np.mean(per_label), abs=1e-12)
    rare = [r for r in rows if r["label"] == "rare"]
    assert [r["value"] is None for r in rare] == [False] * 6 + [True] * 4  # shots 4 and 5 skipped
    notes = fewshot_notes(rows)
    assert notes == [
        "mean over the same 3 of 4 labels at every shots: a, b, c; left out: rare (at most 3 shots)",
        "rare: at most 3 shots (3 eligible patients on the smaller side); no result above 3",
    ]
    # the user may name the set, but only labels that qualify at every shots
    given = run_fewshot(three_labels, shots=[1, 5], seeds=1, head="prototype", mean_labels=["c", "a"])
    gm = [r for r in given if r["label"] == "mean"]
    assert all(r["params"]["labels_in_mean"] == ["a", "c"] for r in gm)
    assert gm[0]["params"]["labels_left_out_of_mean"]["b"] == "not in --mean-labels"
    with pytest.raises(FeatcacheError, match=r"--mean-labels: rare cannot be in the mean.*at most 3 shots"):
        run_fewshot(three_labels, shots=[1, 5], seeds=1, head="prototype", mean_labels=["a", "rare"])


def test_the_command_prints_the_mean_set_once_and_one_line_per_capped_label(three_labels):
    args = ["fewshot", "--cache", str(three_labels), "--shots", "1..8", "--seeds", "2", "--head", "prototype"]
    result = CliRunner().invoke(probes, args)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert [ln for ln in lines if "rare" in ln] == [
        "note: mean over the same 3 of 4 labels at every shots: a, b, c; left out: rare (at most 3 shots)",
        "note: rare: at most 3 shots (3 eligible patients on the smaller side); no result above 3",
    ]


def test_summarize_fewshot_is_mean_and_sd_over_seeds():
    rows = [
        {
            "shots": 2,
            "seed": s,
            "label": "mean",
            "metric": "auroc",
            "value": v,
            "params": {"labels_in_mean": ["a"]},
        }
        for s, v in enumerate([0.6, 0.7, 0.8])
    ]
    rows += [
        {"shots": 2, "seed": 0, "label": "a", "metric": "auroc", "value": 0.1, "params": {}},
        {"shots": 4, "seed": 0, "label": "mean", "metric": "auroc", "value": 0.9, "params": {}},
        {"shots": 8, "seed": 0, "label": "mean", "metric": "auroc", "value": None, "params": {}},
    ]
    s2, s4, s8 = summarize_fewshot(rows)
    assert s2["shots"] == 2 and s2["n_seeds"] == 3 and s2["labels_in_mean"] == ["a"]
    assert s2["mean"] == pytest.approx(0.7) and s2["sd"] == pytest.approx(0.1)  # sqrt(0.02 / 2)
    assert (s4["mean"], s4["sd"], s4["n_seeds"]) == (pytest.approx(0.9), None, 1)
    assert (s8["mean"], s8["n_seeds"]) == (None, 0)


# Support pool for the first-patients case, by hand (columns mass, effusion; sorted: effusion first).
#   p1: rows 0, 1 effusion 1, 1; mass 0, 1  -> has effusion (every image), not mass
#   p2: row 2     effusion 1;   mass 1      -> has both
#   p3: rows 3, 4 effusion 0, 0; mass 1, 1  -> has mass
#   p4: row 5     effusion 1;   mass NaN    -> has effusion (NaN is not positive: not mass)
#   p5: row 6     effusion 0;   mass 1      -> has mass
#   p6: row 7     effusion 0;   mass 0      -> nothing
FP_PIDS = np.array(["p1", "p1", "p2", "p3", "p3", "p4", "p5", "p6"])
FP_Y = np.array(
    [[0, 1], [1, 1], [1, 1], [1, 0], [1, 0], [np.nan, 1], [1, 0], [0, 0]], dtype=np.float32
)  # [mass, effusion]


def test_first_patients_support_by_hand():
    # K = 1: effusion takes p1, mass takes p2 -> rows 0, 1, 2; effusion is 1 on all of them (no episode)
    eps, taken = first_patient_episodes(FP_PIDS, FP_Y, 1, "multilabel", ["mass", "effusion"])
    assert taken == {"effusion": 1, "mass": 1}
    assert [(e.label, e.support.tolist(), e.targets.tolist()) for e in eps] == [(0, [0, 1, 2], [0, 1, 1])]
    # K = 2: effusion takes p1, p2; mass's first two are p2 (taken, not replaced) and p3 -> rows 0..4
    eps, taken = first_patient_episodes(FP_PIDS, FP_Y, 2, "multilabel", ["mass", "effusion"])
    assert taken == {"effusion": 2, "mass": 1}
    assert [(e.label, e.support.tolist(), e.targets.tolist()) for e in eps] == [
        (0, [0, 1, 2, 3, 4], [0, 1, 1, 1, 1]),
        (1, [0, 1, 2, 3, 4], [1, 1, 1, 0, 0]),
    ]
    # K = 3: effusion p1, p2, p4 (row 5: mass NaN, left out of mass's episode); mass p3, p5
    eps, taken = first_patient_episodes(FP_PIDS, FP_Y, 3, "multilabel", ["mass", "effusion"])
    assert taken == {"effusion": 3, "mass": 2}
    assert [e.support.tolist() for e in eps] == [[0, 1, 2, 3, 4, 6], [0, 1, 2, 3, 4, 5, 6]]
    # multi-class: a patient has a class when all its images are that class
    y = np.array([0, 0, 1, 0, 0, 2, 1, 2])
    (e,), taken = first_patient_episodes(FP_PIDS, y, 1, "multiclass", ["x", "y", "z"])
    assert taken == {"x": 1, "y": 1, "z": 1} and e.support.tolist() == [0, 1, 2, 5]  # p1, p2, p4
    with pytest.raises(FeatcacheError, match="no patient has only class 'z'"):
        first_patient_episodes(FP_PIDS, np.array([0, 0, 1, 0, 0, 1, 1, 1]), 1, "multiclass", ["x", "y", "z"])


def test_first_patients_run_fits_the_union_like_sklearn(tmp_path):
    rng = np.random.default_rng(3)
    n_test = 30
    pids = list(FP_PIDS) + [f"t{i}" for i in range(n_test)]
    Yt = (rng.random((n_test, 2)) < 0.5).astype(np.float32)
    Yt[:2] = [[1, 1], [0, 0]]
    Y = np.concatenate([FP_Y, Yt])
    X = rng.normal(size=(len(pids), 5)).astype(np.float32)
    X[:, :2] += 2 * np.nan_to_num(Y)
    split = ["train"] * 6 + ["val"] * 2 + ["test"] * n_test
    cache = _store(tmp_path, {"split": split, "mass": Y[:, 0], "effusion": Y[:, 1]}, X, pids)
    rows = run_fewshot(
        cache, shots=[1, 2], sampling="first-patients", C=0.5, episodes_out=tmp_path / "e.json"
    )
    assert {r["seed"] for r in rows} == {0} and rows[0]["params"]["sampling"] == "first-patients"
    effusion_1 = [r for r in rows if (r["shots"], r["label"]) == (1, "effusion")][0]
    assert effusion_1["value"] is None and "one class" in effusion_1["params"]["skipped"]
    mass_2 = [r for r in rows if (r["shots"], r["label"]) == (2, "mass")][0]
    assert mass_2["params"]["patients_taken"] == {"effusion": 2, "mass": 1} and mass_2["n_train"] == 5
    # reference: scikit-learn on the hand-computed union (rows 0..4), centred + L2-normalised features
    pool = X[:8].astype(np.float64)
    center = pool.mean(0)

    def cl2n(A):
        Z = A - center
        return Z / np.linalg.norm(Z, axis=1, keepdims=True)

    for j, name in enumerate(["mass", "effusion"]):
        ref = LogisticRegression(C=0.5, tol=1e-10, max_iter=10000).fit(cl2n(pool[:5]), FP_Y[:5, j])
        want = roc_auc_score(Yt[:, j], ref.decision_function(cl2n(X[8:].astype(np.float64))))
        got = [r for r in rows if (r["shots"], r["label"]) == (2, name)][0]["value"]
        assert got == pytest.approx(want, abs=1e-6)
    saved = json.loads((tmp_path / "e.json").read_text())["runs"][0]
    assert saved["sampling"] == "first-patients"
    rerun = run_fewshot(cache, sampling="first-patients", C=0.5, episodes_from=tmp_path / "e.json")
    assert [r["value"] for r in rerun if r["label"] == "mass"] == [
        r["value"] for r in rows if r["label"] == "mass"
    ]
    with pytest.raises(FeatcacheError, match="no random episodes"):
        run_fewshot(cache, C=0.5, episodes_from=tmp_path / "e.json")
    with pytest.raises(FeatcacheError, match="deterministic.*leave out --seeds"):
        run_fewshot(cache, shots=[1], seeds=3, sampling="first-patients")


def test_auroc_many_equals_sklearn_with_ties():
    rng = np.random.default_rng(4)
    y = (rng.random(300) < 0.3).astype(float)
    S = np.round(rng.normal(size=(6, 300)) + y, 1).astype(np.float32)  # many ties
    got = auroc_many(y, S)
    np.testing.assert_allclose(got, [roc_auc_score(y, s) for s in S], atol=1e-12)
    assert np.isnan(auroc_many(np.ones(5), S[:, :5])).all()


def test_ranking_scores_order_the_test_rows_as_the_probabilities():
    rng = np.random.default_rng(5)
    X = rng.normal(size=(200, 12)).astype(np.float32) + 1.0
    Y = (rng.random((200, 2)) < 0.4).astype(np.float32)
    Xte = rng.normal(size=(150, 12)).astype(np.float32) + 1.0
    eps = sample_episodes(np.repeat([f"p{i}" for i in range(100)], 2), Y, shots=[2, 5], seeds=2)
    for head in ("logreg", "prototype", "knn"):
        P = fewshot_scores(X, eps, Xte, head=head)
        R = fewshot_scores(X, eps, Xte, head=head, ranking=True)
        for p, r in zip(P, R):
            order = np.argsort(r, kind="stable")
            assert (np.diff(p[order]) >= -1e-12).all(), head
