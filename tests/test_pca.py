"""PCA pictures: components against scikit-learn, the foreground threshold, the picture's size and
layout, determinism, and clear errors."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from sklearn.decomposition import PCA

from featcache.demo import make_demo_dataset
from featcache.errors import FeatcacheError, StoreError
from featcache.pca import patch_pca_rgb, pca_picture
from featcache.store.feature_store import ArraySpec, FeatureStore
from featcache.store.manifest import read_manifest
from featcache.store.preprocess import Preprocess

GRID, DIM = 4, 8


def _minmax(v: np.ndarray) -> np.ndarray:
    return (v - v.min()) / (v.max() - v.min())


def _tokens(n=3, seed=0):
    rng = np.random.default_rng(seed)
    T = rng.normal(size=(n, GRID, GRID, DIM)) * np.array([5, 3, 2, 1, 0.5, 0.4, 0.3, 0.2])
    T[:, 1:3, 1:3, 0] += 30.0  # the centre of every grid stands out along the first feature
    return T.astype(np.float32)


def test_components_match_scikit_learn_up_to_sign():
    T = _tokens()
    rgb, fg, explained = patch_pca_rgb(T)
    assert rgb.shape == (3, GRID, GRID, 3) and rgb.dtype == np.float32 and fg.all()
    flat = T.reshape(-1, DIM).astype(np.float64)
    sk = PCA(n_components=3, svd_solver="full").fit(flat)
    proj = sk.transform(flat)
    np.testing.assert_allclose(explained, sk.explained_variance_ratio_, rtol=1e-5)
    for c in range(3):
        ours = rgb[..., c].ravel()
        assert min(np.abs(ours - _minmax(proj[:, c])).max(), np.abs(ours - _minmax(-proj[:, c])).max()) < 1e-5
    # foreground (the grid centre) is oriented up on the first component
    assert rgb[:, 1:3, 1:3, 0].mean() > rgb[..., 0].mean()


def test_threshold_keeps_foreground_and_refits_on_it():
    T = _tokens()
    rgb, fg, explained = patch_pca_rgb(T, threshold=0.5)
    full, _, _ = patch_pca_rgb(T)
    assert np.array_equal(fg, full[..., 0] > 0.5)
    assert fg[:, 1:3, 1:3].all() and not fg.all()
    assert (rgb[~fg] == 0).all()  # background black
    sk = PCA(n_components=3, svd_solver="full").fit(T[fg].astype(np.float64))
    np.testing.assert_allclose(explained, sk.explained_variance_ratio_, rtol=1e-5)
    with pytest.raises(FeatcacheError, match="--threshold"):
        patch_pca_rgb(T, threshold=1.5)


def _store(tmp_path, patch=True):
    manifest = make_demo_dataset(tmp_path / "data", n_patients=3, images_per_patient=1, size=64)
    m = read_manifest(manifest)
    arrays = {"cls": ArraySpec((DIM,)), "pooled": ArraySpec((DIM,))}
    if patch:
        arrays["patch"] = ArraySpec((GRID, GRID, DIM), "float16")
    store = FeatureStore(tmp_path / "cache", mode="a")
    attrs = {"preprocessing": Preprocess(res=64).to_dict(), "model": "synthetic", "res": 64}
    fs = store.create_set("demo/synthetic/64", m, arrays, attrs)
    data = {"cls": np.zeros((3, DIM), np.float32), "pooled": np.zeros((3, DIM), np.float32)}
    if patch:
        data["patch"] = _tokens(3).astype(np.float16)
    fs.write_shard(0, data, {})
    return tmp_path / "cache", list(m.ids)


def test_picture_size_layout_and_determinism(tmp_path):
    cache, ids = _store(tmp_path)
    a = pca_picture(cache, ids=ids[:2], out=tmp_path / "a.png")
    b = pca_picture(cache, ids=ids[:2], out=tmp_path / "b.png")
    cell = 224  # the resolution (64) raised to the 224-pixel minimum
    assert a.size == (2 * cell + 3 * 4, 2 * cell + 3 * 4)
    img = np.asarray(Image.open(a.path))
    assert img.shape == (a.size[1], a.size[0], 3) and img.dtype == np.uint8
    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    assert digest(a.path) == digest(b.path)
    # left cell: the grayscale image; right cell: one flat colour per patch (224 / 4 = 56 pixels)
    left = img[4 : 4 + cell, 4 : 4 + cell].astype(int)
    assert (left[..., 0] == left[..., 1]).all() and left.std() > 10
    right = img[4 : 4 + cell, 8 + cell : 8 + 2 * cell]
    blocks = right.reshape(GRID, cell // GRID, GRID, cell // GRID, 3)
    assert (blocks == blocks[:, :1, :, :1]).all()
    # the same tokens give the same colours whichever images are drawn with them
    rgb, _, _ = patch_pca_rgb(_tokens(3)[:2].astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(blocks[:, 0, :, 0], np.round(rgb[0] * 255).astype(np.uint8))
    three = pca_picture(cache, ids=ids, out=tmp_path / "c.png", threshold=0.5, cell=64)
    assert three.size == (2 * 64 + 12, 3 * 64 + 16) and 0 < three.foreground < 1
    assert len(three.foreground_per_image) == 3
    assert np.mean(three.foreground_per_image) == pytest.approx(three.foreground)  # images share one grid


def test_errors_and_cli(tmp_path):
    cache, ids = _store(tmp_path)
    with pytest.raises(FeatcacheError, match=r"unknown ids \['nope'\]"):
        pca_picture(cache, ids=["nope"], out=tmp_path / "x.png")
    with pytest.raises(FeatcacheError, match="not found; pass the image root"):
        pca_picture(cache, ids=ids[:1], out=tmp_path / "x.png", root=tmp_path / "elsewhere")
    cache2, _ = _store(tmp_path / "nopatch", patch=False)
    with pytest.raises(StoreError, match="--tokens cls,pooled,patch"):
        pca_picture(cache2, ids=ids[:1], out=tmp_path / "x.png")

    from cli import featcache

    out = tmp_path / "cli.png"
    res = CliRunner().invoke(
        featcache, ["pca", "--cache", str(cache), "--ids", ",".join(ids), "--out", str(out), "--threshold"]
    )
    assert res.exit_code == 0, res.output
    assert out.is_file() and "foreground" in res.output and "460x688" in res.output
    res = CliRunner().invoke(featcache, ["pca", "--cache", str(cache), "--ids", "nope", "--out", str(out)])
    assert res.exit_code == 1 and "Traceback" not in res.output and "unknown ids" in res.output
