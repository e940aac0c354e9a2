"""Extraction end to end with tiny random models: stored features equal a direct forward,
resume after a kill is bit-identical, failures are recorded, workers split shards."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from featcache.decode.images import read_image
from featcache.errors import FeatcacheError, ImageReadError, ManifestError
from featcache.extract import ExtractConfig, extract
from featcache.extract.transform import model_input
from featcache.models import load_backbone
from featcache.store.check import verify
from featcache.store.feature_store import FAILED, OK, FeatureStore
from featcache.store.manifest import write_manifest
from featcache.store.preprocess import Preprocess

REPO = Path(__file__).resolve().parents[1]


def _write_dicom(path: Path, arr: np.ndarray, monochrome1: bool = False) -> None:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CR"
    ds.PatientID = "x"
    ds.Rows, ds.Columns = arr.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = arr.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)


def _dataset(root: Path, n: int = 10, size: int = 40, kinds=("png8",), seed: int = 0) -> Path:
    """n images cycling through the given kinds; returns the manifest path."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        kind = kinds[i % len(kinds)]
        base = (rng.random((size, size)) * 0.5 + np.linspace(0, 0.5, size)[None, :]).astype(np.float32)
        if kind == "png8":
            p = f"img{i}.png"
            Image.fromarray((base * 255).astype(np.uint8)).save(root / p)
        elif kind == "png16":
            p = f"img{i}.png"
            Image.fromarray((base * 65535).astype(np.uint16)).save(root / p)
        elif kind == "jpeg":
            p = f"img{i}.jpg"
            Image.fromarray((base * 255).astype(np.uint8)).save(root / p, quality=95)
        elif kind == "dicom":
            p = f"img{i}.dcm"
            _write_dicom(root / p, base * 4095)
        paths.append(p)
    cols = {
        "path": paths,
        "patient_id": [f"p{i // 2}" for i in range(n)],
        "split": ["train" if (i // 2) % 2 == 0 else "test" for i in range(n)],
        "finding": [float(i % 2) for i in range(n)],
    }
    return write_manifest(root / "manifest.csv", cols)


def _cfg(root: Path, manifest: Path, **kw) -> ExtractConfig:
    base = dict(model="random:dinov3-vits16", data=str(manifest), out=str(root / "cache"), res=32, workers=0)
    base.update(kw)
    return ExtractConfig(**base)


@pytest.mark.parametrize(
    ("model", "res"),
    [
        ("random:dinov3-vits16", 32),
        ("random:dinov2-vits14", 28),
        ("random:dinov2-vits14-reg", 28),
        ("random:dinov3-convnext-tiny", 64),
    ],
)
def test_stored_features_equal_direct_forward(tmp_path, model, res):
    manifest = _dataset(tmp_path, n=8, kinds=("png8", "png16", "jpeg", "dicom"))
    r = extract(_cfg(tmp_path, manifest, model=model, res=res, batch_size=3, shard_rows=4), progress=False)
    assert (r.n, r.failed, r.pending, r.processed) == (8, 0, 0, 8)
    fs = FeatureStore(tmp_path / "cache").open_set(r.set_name)
    backbone = load_backbone(model, seed=0)
    spec = backbone.spec
    pre = Preprocess(res=res, mean=tuple(spec.mean), std=tuple(spec.std))
    paths = [tmp_path / p for p in fs.paths]
    pixels = torch.stack([model_input(pre, read_image(p)) for p in paths])
    with torch.inference_mode():
        direct = backbone(pixels)
    np.testing.assert_allclose(fs.read("cls"), direct["cls"].numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(fs.read("pooled"), direct["pooled"].numpy(), rtol=1e-4, atol=1e-4)
    assert verify(fs) == []
    assert fs.attrs["provenance"]["source"] == "random"
    assert (
        fs.record.res == res
        and fs.attrs["res"] == res
        and "config" not in fs.attrs
        and fs.attrs["manifest_digest"]
    )


def test_tokens_layers_and_patch_pool(tmp_path):
    manifest = _dataset(tmp_path, n=4)
    r = extract(
        _cfg(tmp_path, manifest, res=64, tokens=("cls", "registers", "patch"), layers="last2", patch_pool=2),
        progress=False,
    )
    fs = FeatureStore(tmp_path / "cache").open_set(r.set_name)
    assert fs.shape("registers") == (4, 4, 384)
    assert fs.shape("patch") == (4, 2, 2, 384)  # 64 px / 16 = 4x4 patches, pooled by 2
    assert fs.shape("layer_cls") == (4, 2, 384)
    np.testing.assert_allclose(fs.read("layer_cls")[:, -1], fs.read("cls"), rtol=1e-5, atol=1e-5)
    patch = fs.read("patch").astype(np.float32)
    # pooled is the mean of the (unpooled) patch tokens: the pooled grid keeps that mean
    np.testing.assert_allclose(patch.mean(axis=(1, 2)), fs.read("pooled"), rtol=2e-2, atol=2e-3)


def test_rerun_resumes_and_refuses_other_settings(tmp_path):
    manifest = _dataset(tmp_path, n=6)
    first = extract(_cfg(tmp_path, manifest, shard_rows=2), progress=False)
    again = extract(_cfg(tmp_path, manifest, shard_rows=2), progress=False)
    assert first.processed == 6 and again.processed == 0 and again.shards_skipped == 3
    with pytest.raises(FeatcacheError, match="other settings"):
        extract(_cfg(tmp_path, manifest, shard_rows=2, resize="letterbox"), progress=False)


def test_undecodable_file_skip_and_fail(tmp_path):
    manifest = _dataset(tmp_path, n=6)
    (tmp_path / "img3.png").write_bytes(b"not a png")
    r = extract(_cfg(tmp_path, manifest, shard_rows=4), progress=False)
    assert r.failed == 1 and r.pending == 0
    assert r.failures[0]["id"] == "img3.png" and "img3.png" in r.failures[0]["reason"]
    fs = FeatureStore(tmp_path / "cache").open_set(r.set_name)
    assert fs.status.tolist() == [OK, OK, OK, FAILED, OK, OK]
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(tmp_path / "img3.png")  # fixed by the user
    r2 = extract(_cfg(tmp_path, manifest, shard_rows=4, retry_failed=True), progress=False)
    assert r2.failed == 0 and r2.processed == 4  # only the shard holding the failed row is redone
    (tmp_path / "img5.png").write_bytes(b"")
    with pytest.raises(ImageReadError, match="img5.png"):
        extract(
            _cfg(tmp_path, manifest, out=str(tmp_path / "c2"), on_error="fail", shard_rows=2), progress=False
        )
    fs2 = FeatureStore(tmp_path / "c2").open_set()
    assert fs2.status[:4].tolist() == [OK] * 4  # shards finished before the failure are kept


def test_bad_manifest_fails_before_model_load(tmp_path):
    (tmp_path / "m.csv").write_text("path\nmissing.png\n")
    with pytest.raises(ManifestError, match="missing.png"):
        extract(_cfg(tmp_path, tmp_path / "m.csv", model="random:no-such-model"), progress=False)


def test_workers_write_disjoint_shards(tmp_path):
    manifest = _dataset(tmp_path, n=10)
    single = extract(_cfg(tmp_path, manifest, out=str(tmp_path / "one"), shard_rows=2), progress=False)
    for i in range(3):
        r = extract(
            _cfg(tmp_path, manifest, out=str(tmp_path / "multi"), shard_rows=2, num_shards=3, shard_index=i),
            progress=False,
        )
    assert r.pending == 0
    a = FeatureStore(tmp_path / "one").open_set(single.set_name)
    b = FeatureStore(tmp_path / "multi").open_set(single.set_name)
    np.testing.assert_array_equal(a.read("cls"), b.read("cls"))
    np.testing.assert_array_equal(a.read("pooled"), b.read("pooled"))


_RUNNER = """
import sys
from featcache.extract import ExtractConfig, extract
cfg = ExtractConfig(model="random:dinov3-vits16", data=sys.argv[1], out=sys.argv[2], res=32, workers=0,
                    shard_rows=2, batch_size=1)
extract(cfg, progress=False)
"""


def _wait_ok_rows(store: Path, at_least: int, proc, timeout=120.0) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            fs = FeatureStore(store).open_set()
            if int((fs.status == OK).sum()) >= at_least:
                return
        except FeatcacheError:
            pass
        if proc.poll() is not None:
            return
        time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_kill_and_resume_is_bit_identical(tmp_path, sig):
    manifest = _dataset(tmp_path, n=12)
    clean = tmp_path / "clean"
    subprocess.run([sys.executable, "-c", _RUNNER, str(manifest), str(clean)], check=True, cwd=REPO)
    killed = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    left = []
    for stop_after in (2, 6):  # kill at two points, then let it finish
        proc = subprocess.Popen(
            [sys.executable, "-c", _RUNNER, str(manifest), str(killed)], cwd=REPO, env=env
        )
        _wait_ok_rows(killed, stop_after, proc)
        proc.send_signal(sig)
        proc.wait(timeout=60)
        left.append(int((FeatureStore(killed).open_set().status == OK).sum()))
    assert any(0 < k < 12 for k in left), left  # at least one kill really landed mid-run
    subprocess.run([sys.executable, "-c", _RUNNER, str(manifest), str(killed)], check=True, cwd=REPO, env=env)
    a = FeatureStore(clean).open_set()
    b = FeatureStore(killed).open_set()
    assert verify(b) == []
    assert b.ids.tolist() == a.ids.tolist()
    for key in ("cls", "pooled"):
        np.testing.assert_array_equal(a.read(key), b.read(key))


def test_out_of_memory_halves_the_micro_batch(tmp_path, monkeypatch):
    import featcache.extract.device as exd

    manifest = _dataset(tmp_path, n=8)
    ref = extract(_cfg(tmp_path, manifest, out=str(tmp_path / "ref"), batch_size=8), progress=False)
    real_forward = exd.forward
    sizes = []

    def small_gpu(backbone, pixels, layers, device, dtype, layer_patch=False):
        sizes.append(len(pixels))
        if len(pixels) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_forward(backbone, pixels, layers, device, dtype, layer_patch)

    monkeypatch.setattr(exd, "forward", small_gpu)
    r = extract(_cfg(tmp_path, manifest, out=str(tmp_path / "oom"), batch_size=8), progress=False)
    assert r.batch_size == 2 and r.failed == 0 and r.pending == 0
    assert sizes == [8, 4, 2, 2, 2, 2]  # back-off, then the failed chunk recomputed and the rest at 2
    assert r.micro_batch == {"requested": 8, "final": 2, "smallest": 2, "out_of_memory": 2, "grown_back": 0}
    fs = FeatureStore(tmp_path / "oom").open_set(r.set_name)
    a = FeatureStore(tmp_path / "ref").open_set(ref.set_name).read("cls")
    np.testing.assert_allclose(a, fs.read("cls"), rtol=1e-4, atol=1e-5)


def test_micro_batch_grows_back_after_good_chunks(tmp_path, monkeypatch):
    import featcache.extract.device as exd

    manifest = _dataset(tmp_path, n=24)
    ref = extract(_cfg(tmp_path, manifest, out=str(tmp_path / "ref"), batch_size=4), progress=False)
    real_forward = exd.forward
    sizes = []

    def transient(backbone, pixels, layers, device, dtype, layer_patch=False):
        sizes.append(len(pixels))
        if len(sizes) == 1:  # one out-of-memory (another process held memory for a moment)
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_forward(backbone, pixels, layers, device, dtype, layer_patch)

    monkeypatch.setattr(exd, "forward", transient)
    monkeypatch.setattr(exd, "GROW_AFTER", 3)
    r = extract(_cfg(tmp_path, manifest, out=str(tmp_path / "oom"), batch_size=4), progress=False)
    # 4 fails -> 2, 2 | 2 (third good chunk: back to 4), the batch's last 2 | then 4 for the other 16 rows
    assert sizes == [4, 2, 2, 2, 2, 4, 4, 4, 4]
    assert r.batch_size == 4 and r.micro_batch["grown_back"] == 1 and r.micro_batch["smallest"] == 2
    a = FeatureStore(tmp_path / "ref").open_set(ref.set_name).read("cls")
    b = FeatureStore(tmp_path / "oom").open_set(r.set_name).read("cls")
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_micro_batch_backoff_rules():
    from featcache.extract.device import MicroBatch

    m = MicroBatch(64, grow_after=2)
    m.out_of_memory()
    assert m.size == 32
    m.succeeded()
    m.succeeded()
    assert m.size == 64 and m.grows == 1
    m.out_of_memory()  # growing back failed at once: the next try waits twice as long
    assert (m.size, m.grow_after) == (32, 4)
    for _ in range(3):
        m.succeeded()
    assert m.size == 32
    m.succeeded()
    assert m.size == 64
    for _ in range(10):
        m.succeeded()
    assert m.size == 64  # never above the requested batch
    one = MicroBatch(1)
    with pytest.raises(torch.OutOfMemoryError):
        one.out_of_memory()


@pytest.mark.slow
def test_ctrl_c_from_the_command_line_exits_130_and_resumes(tmp_path):
    manifest = _dataset(tmp_path, n=40)
    store = tmp_path / "cache"
    cmd = [
        sys.executable, "-c", "from cli import featcache; featcache()", "extract", "--model", "random:dinov3-vits16",
        "--res", "32", "--data", str(manifest), "--out", str(store), "--workers", "0", "--batch-size", "1",
        "--shard-size", "2", "--quiet",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
    _wait_ok_rows(store, 4, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    if proc.returncode == 0:
        pytest.skip("the run finished before the signal arrived")
    assert proc.returncode == 130 and "Interrupted:" in err and "Traceback" not in err
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    assert done.returncode == 0 and "40/40 rows done" in done.stdout


@pytest.mark.slow
def test_compiled_model_stores_the_same_features(tmp_path):
    manifest = _dataset(tmp_path, n=4)
    plain = extract(_cfg(tmp_path, manifest, out=str(tmp_path / "plain"), res=64), progress=False)
    compiled = extract(
        _cfg(tmp_path, manifest, out=str(tmp_path / "compiled"), res=64, compile=True), progress=False
    )
    assert compiled.failed == 0 and compiled.pending == 0
    a = FeatureStore(tmp_path / "plain").open_set(plain.set_name).read("cls")
    b = FeatureStore(tmp_path / "compiled").open_set(compiled.set_name).read("cls")
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
