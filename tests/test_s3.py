"""Object storage end to end against a moto S3 server on 127.0.0.1: stores, image roots, locks.

Skipped when s3fs or moto (with its server) is not installed (``pip install 'featcache[s3]' moto[server]``).
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

from featcache.commands import featcache  # noqa: E402
from featcache.decode.images import read_image  # noqa: E402
from featcache.errors import ManifestError, StoreError  # noqa: E402
from featcache.extract import ExtractConfig, extract  # noqa: E402
from featcache.store.feature_store import FeatureStore  # noqa: E402
from featcache.store.locks import remote_extraction_lock, remote_lock_url  # noqa: E402
from featcache.store.manifest import read_manifest, write_manifest  # noqa: E402
from featcache.urls import UrlPath  # noqa: E402
from probes.commands import probes  # noqa: E402


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on 127.0.0.1 (free port) with an empty bucket; yields the storage options."""
    env = pytest.MonkeyPatch()
    env.setenv("AWS_ACCESS_KEY_ID", "testing")
    env.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    env.setenv("AWS_DEFAULT_REGION", "us-east-1")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    assert host == "127.0.0.1"
    options = {"client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port}"}, "skip_instance_cache": True}
    import s3fs

    fs = s3fs.S3FileSystem(**options)
    fs.mkdir("bucket")
    yield {"options": options, "fs": fs}
    server.stop()
    env.undo()


def _dataset(root, n: int = 8, size: int = 36):
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        p = f"sub/img{i}.png"
        (root / "sub").mkdir(exist_ok=True)
        Image.fromarray((rng.random((size, size)) * 255).astype(np.uint8)).save(root / p)
        paths.append(p)
    cols = {
        "path": paths,
        "patient_id": [f"p{i // 2}" for i in range(n)],
        "split": ["train" if (i // 2) % 2 == 0 else "test" for i in range(n)],
        "finding": [float(i % 2) for i in range(n)],
    }
    return write_manifest(root / "manifest.csv", cols)


def _upload(s3, folder, prefix: str) -> str:
    for f in folder.rglob("*.png"):
        s3["fs"].put_file(str(f), f"{prefix}/{f.relative_to(folder).as_posix()}")
    return f"s3://{prefix}"


def _extract_args(manifest, out, root, options=None):
    args = ["extract", "--model", "random:dinov3-vits16", "--res", "32", "--data", str(manifest)]
    args += ["--out", out, "--root", str(root), "--workers", "0", "--name", "t/rand/32"]
    return args + (["--storage-options", json.dumps(options)] if options else [])


def test_store_on_s3_equals_local_and_probes_agree(s3, tmp_path):
    manifest = _dataset(tmp_path)
    options = s3["options"]
    local = tmp_path / "local"
    runner = CliRunner()
    r = runner.invoke(featcache, _extract_args(manifest, str(local), tmp_path))
    assert r.exit_code == 0, r.output
    r = runner.invoke(featcache, _extract_args(manifest, "s3://bucket/cache", tmp_path, options))
    assert r.exit_code == 0, r.output
    remote = FeatureStore("s3://bucket/cache", storage_options=options).open_checked("t/rand/32")
    here = FeatureStore(local).open_checked("t/rand/32")
    assert remote.n == here.n == 8 and remote.ok.all()
    a, b = remote.read("cls"), here.read("cls")
    assert a.dtype == b.dtype == np.float32 and a.tobytes() == b.tobytes()  # bit-identical
    assert remote.manifest_digest() == here.manifest_digest() == remote.attrs["manifest_digest"]
    # the lock object is gone once the run ended
    assert not s3["fs"].exists(remote_lock_url(remote, "extract.lock"))

    so = ["--storage-options", json.dumps(options)]
    r = runner.invoke(featcache, ["ls", "s3://bucket/cache", *so])
    assert r.exit_code == 0 and "t/rand/32" in r.output, r.output
    r = runner.invoke(featcache, ["verify", "s3://bucket/cache", *so])
    assert r.exit_code == 0, r.output
    r = runner.invoke(featcache, ["ls", "s3://bucket/cache", "--storage-options", "[1]"])
    assert r.exit_code != 0 and "must be a JSON object" in r.output

    rows = {}
    for name, cache, extra in (("local", str(local), []), ("s3", "s3://bucket/cache", so)):
        out = tmp_path / f"{name}.jsonl"
        args = ["knn", "--cache", cache, "--k", "3", "--bootstrap", "20", "--out", str(out), *extra]
        r = runner.invoke(probes, args)
        assert r.exit_code == 0, r.output
        rows[name] = [json.loads(line) for line in out.read_text().splitlines()]
    keep = ("k", "label", "metric", "value", "ci_low", "ci_high")
    assert [[x.get(k) for k in keep] for x in rows["s3"]] == [[x.get(k) for k in keep] for x in rows["local"]]
    assert any(x["metric"] == "auroc" for x in rows["s3"])


@pytest.fixture(scope="module")
def remote_set(s3, tmp_path_factory):
    """A finished 4-row set at s3://bucket/locked and the arguments that extracted it."""
    folder = tmp_path_factory.mktemp("locked")
    args = _extract_args(_dataset(folder, n=4), "s3://bucket/locked", folder, s3["options"])
    r = CliRunner().invoke(featcache, args)
    assert r.exit_code == 0, r.output
    fs = FeatureStore("s3://bucket/locked", mode="a", storage_options=s3["options"]).open_set("t/rand/32")
    return fs, args


def test_second_remote_writer_is_refused_in_one_line(remote_set):
    fs, args = remote_set
    runner = CliRunner()
    with remote_extraction_lock(fs, 0, 1):
        r = runner.invoke(featcache, args)
        assert r.exit_code != 0
        lines = r.output.strip().splitlines()
        assert len(lines) == 1 and "another extraction is writing feature set 't/rand/32'" in lines[0]
        with pytest.raises(StoreError, match="another extraction"):  # a slice worker is refused too
            with remote_extraction_lock(fs, 1, 2):
                pass
    # slices: the same slice twice is refused, another slice coexists, another --num-shards is refused
    with remote_extraction_lock(fs, 0, 2):
        with pytest.raises(StoreError, match="another extraction"):
            with remote_extraction_lock(fs, 0, 2):
                pass
        with remote_extraction_lock(fs, 1, 2):
            pass
        with pytest.raises(StoreError, match="--num-shards 2"):
            with remote_extraction_lock(fs, 0, 3):
                pass
        with pytest.raises(StoreError, match="another extraction"):
            with remote_extraction_lock(fs, 0, 1):
                pass
    with remote_extraction_lock(fs, 0, 1):  # all released
        pass


def test_stale_remote_lock_is_reported_with_the_command_that_clears_it(s3, remote_set):
    fs, _ = remote_set
    lock = remote_lock_url(fs, "extract.lock")
    s3["fs"].pipe_file(
        lock[len("s3://") :], json.dumps({"owner": "h:1:x", "heartbeat": time.time() - 9999}).encode()
    )
    with pytest.raises(StoreError) as e:
        with remote_extraction_lock(fs, 0, 1):
            pass
    assert f"aws s3 rm {lock}" in str(e.value) and "h:1:x" in str(e.value) and "\n" not in str(e.value)
    s3["fs"].rm_file(lock[len("s3://") :])
    with remote_extraction_lock(fs, 0, 1):
        pass


def test_images_on_s3_read_like_local_files_and_paths_stay_inside(s3, tmp_path):
    manifest = _dataset(tmp_path, n=4)
    root = _upload(s3, tmp_path, "bucket/images")
    m = read_manifest(manifest, root, storage_options=s3["options"])
    assert isinstance(m.root, UrlPath) and str(m.abspath(0)) == f"{root}/sub/img0.png"
    for i in range(len(m)):
        np.testing.assert_array_equal(read_image(m.abspath(i)), read_image(tmp_path / m.paths[i]))
    bad = write_manifest(tmp_path / "bad.csv", {"path": ["../escape.png", "sub/img0.png", "sub/nothere.png"]})
    with pytest.raises(ManifestError) as e:
        read_manifest(bad, root, storage_options=s3["options"])
    assert "outside the root" in str(e.value)
    missing = write_manifest(tmp_path / "missing.csv", {"path": ["sub/img0.png", "sub/nothere.png"]})
    with pytest.raises(ManifestError, match="do not exist under"):
        read_manifest(missing, root, storage_options=s3["options"])
    read_manifest(missing, root, check_files=False, storage_options=s3["options"])


def test_extract_with_images_on_s3_equals_local_images(s3, tmp_path):
    manifest = _dataset(tmp_path, n=4)
    root = _upload(s3, tmp_path, "bucket/images2")
    base = dict(model="random:dinov3-vits16", data=str(manifest), res=32, workers=0, name="t/rand/32")
    extract(ExtractConfig(out=str(tmp_path / "local"), root=str(tmp_path), **base), progress=False)
    r = CliRunner().invoke(featcache, _extract_args(manifest, "s3://bucket/cache2", root, s3["options"]))
    assert r.exit_code == 0, r.output
    remote = FeatureStore("s3://bucket/cache2", storage_options=s3["options"]).open_set("t/rand/32")
    local = FeatureStore(tmp_path / "local").open_set("t/rand/32")
    assert remote.read("cls").tobytes() == local.read("cls").tobytes()
