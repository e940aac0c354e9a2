"""Volumes end to end: NIfTI volumes -> slice manifest -> extraction -> probes pooled per volume."""

from __future__ import annotations

import nibabel as nib
import numpy as np
from sklearn.metrics import roc_auc_score

from featcache.datasets.volumes import expand_volumes
from featcache.extract import ExtractConfig, extract
from featcache.store.feature_store import FeatureStore
from featcache.store.manifest import write_manifest
from probes.estimators.knn import KNNProbe
from probes.run import run_knn


def test_knn_on_volumes_pools_slices_per_volume(tmp_path):
    rng = np.random.default_rng(0)
    paths, labels, splits = [], [], []
    for v in range(16):
        vol = rng.normal(100, 10, (24, 24, 6)).astype(np.float32)
        lesion = v % 2 == 1
        if lesion:  # a bright block on some slices only: pooling over slices is what finds it
            vol[8:16, 8:16, 2:4] += 300
        nib.save(nib.Nifti1Image(vol, np.eye(4)), tmp_path / f"v{v}.nii.gz")
        paths.append(f"v{v}.nii.gz")
        labels.append(float(lesion))
        splits.append("train" if v < 10 else "test")
    write_manifest(tmp_path / "vols.csv", {"path": paths, "split": splits, "lesion": labels})
    expand_volumes(tmp_path / "vols.csv", tmp_path / "slices", window="400,200")
    r = extract(
        ExtractConfig(
            model="random:dinov3-vits16", data=str(tmp_path / "slices" / "manifest.csv"),
            out=str(tmp_path / "cache"), res=32, workers=0,
        ),
        progress=False,
    )  # fmt: skip
    assert r.n == 16 * 6 and r.failed == 0
    rows = run_knn(tmp_path / "cache", k=(3,), aggregate="mean", n_boot=50)
    mean = next(x for x in rows if x["label"] == "mean" and x["metric"] == "auroc")
    assert mean["n_test"] == 6 and mean["params"]["aggregate"] == "mean"

    # independent reference: numpy mean of the stored slice features per volume, then the same kNN
    fs = FeatureStore(tmp_path / "cache").open_set()
    X, vols, split = fs.read("cls"), fs.meta("volume"), fs.splits
    names = sorted(set(vols.tolist()), key=lambda s: int(s[1:].split(".")[0]))
    agg = np.stack([X[vols == n].mean(axis=0) for n in names])
    y = np.array([labels[paths.index(n)] for n in names])
    is_train = np.array([split[vols == n][0] == "train" for n in names])
    probe = KNNProbe(k=(3,)).fit(agg[is_train], y[is_train, None])
    scores = probe.predict_scores(agg[~is_train])[3][:, 0]
    assert abs(mean["value"] - roc_auc_score(y[~is_train], scores)) < 1e-9
