"""Fault injection: a kill, a full disk or a read-only file system at every store event of a small
extraction; the next run resumes to a store bit-identical to an uninterrupted one.

Every store write calls ``featcache.store.io.fault_point(label)`` first. In process, the tests
replace it by one that raises at the N-th event (``_Kill`` is a BaseException, which nothing in
featcache catches, like a signal that ends the process); in subprocesses, ``FEATCACHE_FAULT_AT=N``
ends the process with ``os._exit`` there, as SIGKILL would. The cases are listed in
docs/RELIABILITY.md.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from featcache.errors import ExtractionAborted, FeatcacheError, StoreError
from featcache.extract import ExtractConfig, extract
from featcache.store import io as store_io
from featcache.store.feature_store import FeatureStore
from featcache.store.manifest import read_manifest, write_manifest

REPO = Path(__file__).resolve().parents[1]
N_ROWS, SHARD = 6, 2
_COMPARED = ("ids", "paths", "patient_ids", "splits", "labels", "status", "failure", "cls", "pooled")


# A tiny deterministic stand-in for the backbone (the store is what is under test here; a real
# random ViT costs seconds per run on a loaded 2-core machine). Shared with the subprocesses.
_FAST = """
import types, torch
import featcache.models as _fm

class _Tiny(torch.nn.Module):
    spec = types.SimpleNamespace(name="tiny", mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    num_layers = 2
    provenance = {"source": "random", "weights": "tiny-seed0"}

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.w = torch.nn.Linear(3 * 16, 8)

    def forward(self, pixels, layers=()):
        x = torch.nn.functional.adaptive_avg_pool2d(pixels.float(), 4).flatten(1)
        cls = self.w(x)
        return {"cls": cls, "pooled": torch.tanh(cls)}

_fm.load_backbone = lambda *a, **k: _Tiny()
"""


class _Kill(BaseException):
    """Ends the run where it stands, like SIGKILL (caught by nothing in featcache)."""


def _dataset(root: Path, n: int = N_ROWS) -> Path:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        Image.fromarray((rng.random((40, 40)) * 255).astype(np.uint8)).save(root / f"img{i}.png")
        paths.append(f"img{i}.png")
    cols = {
        "path": paths,
        "patient_id": [f"p{i // 2}" for i in range(n)],
        "split": ["train" if (i // 2) % 2 == 0 else "test" for i in range(n)],
        "finding": [float(i % 2) for i in range(n)],
    }
    return write_manifest(root / "manifest.csv", cols)


def _cfg(manifest: Path, out: Path, **kw) -> ExtractConfig:
    base = dict(
        model="random:dinov3-vits16",
        data=str(manifest),
        out=str(out),
        res=32,
        workers=0,
        shard_rows=SHARD,
        batch_size=2,
    )
    base.update(kw)
    return ExtractConfig(**base)


def _snapshot(out: Path) -> dict:
    fs = FeatureStore(out).open_checked()
    snap = {k: np.asarray(fs.group[k][:]) for k in _COMPARED}
    snap["attrs"] = {k: v for k, v in fs.attrs.items() if k not in ("created", "updated")}
    return snap


def _assert_same(a: dict, b: dict, case: str) -> None:
    for key in _COMPARED:
        np.testing.assert_array_equal(a[key], b[key], err_msg=f"{case}: {key}")
    assert a["attrs"] == b["attrs"], case


@pytest.fixture(autouse=True)
def _fast_backbone(monkeypatch):
    import featcache.models as fm

    real = fm.load_backbone
    exec(_FAST, {})
    tiny = fm.load_backbone
    fm.load_backbone = real
    monkeypatch.setattr(fm, "load_backbone", tiny)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run, and the labels of every store event it makes, in order."""
    root = tmp_path_factory.mktemp("faults")
    manifest = _dataset(root)
    events: list[str] = []
    import featcache.models as fm

    real, real_load = store_io.fault_point, fm.load_backbone
    store_io.fault_point = events.append
    exec(_FAST, {})
    try:
        extract(_cfg(manifest, root / "clean"), progress=False)
    finally:
        store_io.fault_point, fm.load_backbone = real, real_load
    return root, manifest, events, _snapshot(root / "clean")


def _inject(monkeypatch, at: int, exc: BaseException) -> list[str]:
    seen: list[str] = []

    def fault(label: str) -> None:
        seen.append(label)
        if len(seen) == at:
            raise exc

    monkeypatch.setattr(store_io, "fault_point", fault)
    return seen


def test_event_list_covers_creation_commits_and_attributes(reference):
    _, _, events, _ = reference
    assert events[0] == "create:columns" and "create:publish" in events and "create:marker" in events
    assert [e for e in events if e.endswith(":status")][1:] == [f"shard {s}:status" for s in range(3)]
    # the consolidated metadata for other Zarr readers is rewritten at creation and after the attributes
    assert events[-2:] == ["attrs", "consolidate"] and events.count("consolidate") == 2
    assert len(events) == 9 + 5 * 3 + 2


def test_kill_at_every_store_event_resumes_bit_identical(reference, tmp_path, monkeypatch):
    root, manifest, events, clean = reference
    for at in range(1, len(events) + 1):
        out = tmp_path / f"kill{at}"
        seen = _inject(monkeypatch, at, _Kill())
        with pytest.raises(_Kill):
            extract(_cfg(manifest, out), progress=False)
        assert seen[-1] == events[at - 1]
        monkeypatch.setattr(store_io, "fault_point", lambda label: None)
        extract(_cfg(manifest, out), progress=False)
        _assert_same(clean, _snapshot(out), f"kill before {events[at - 1]}")
        assert not list(out.rglob(f"{store_io.TMP_PREFIX}*")), "a temporary set folder was left behind"


@pytest.mark.parametrize(
    ("code", "words"),
    [(errno.ENOSPC, "no space left"), (errno.EROFS, "read-only"), (errno.EFBIG, "file size limit")],
)
def test_write_errors_at_every_event_are_one_line_then_resume(reference, tmp_path, monkeypatch, code, words):
    root, manifest, events, clean = reference
    step = 1 if code == errno.ENOSPC else 4  # every event for a full disk; a sample for the others
    for at in range(1, len(events) + 1, step):
        out = tmp_path / f"e{at}"
        _inject(monkeypatch, at, OSError(code, os.strerror(code), str(out / "somefile")))
        with pytest.raises(StoreError) as info:
            extract(_cfg(manifest, out), progress=False)
        msg = str(info.value)
        assert words in msg and "\n" not in msg and str(out) in msg, msg
        monkeypatch.setattr(store_io, "fault_point", lambda label: None)
        extract(_cfg(manifest, out), progress=False)
        _assert_same(clean, _snapshot(out), f"{errno.errorcode[code]} at {events[at - 1]}")


def test_read_only_store_folder_is_one_line(tmp_path, monkeypatch, reference):
    import featcache.store.feature_store as store_mod

    _, manifest, _, _ = reference

    def refuse(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system", str(tmp_path / "ro"))

    monkeypatch.setattr(store_mod.zarr, "open_group", refuse)
    with pytest.raises(StoreError, match="read-only.*writable folder"):
        extract(_cfg(manifest, tmp_path / "ro"), progress=False)


def test_cpu_out_of_memory_is_one_line_and_resumes(reference, tmp_path, monkeypatch):
    import featcache.extract.pipeline as ex

    _, manifest, _, clean = reference
    real = ex._to_numpy
    calls = []

    def oom(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise MemoryError()
        return real(*a, **k)

    monkeypatch.setattr(ex, "_to_numpy", oom)
    with pytest.raises(ExtractionAborted, match="out of memory \\(CPU RAM\\).*--batch-size"):
        extract(_cfg(manifest, tmp_path / "oom"), progress=False)
    monkeypatch.setattr(ex, "_to_numpy", real)
    extract(_cfg(manifest, tmp_path / "oom"), progress=False)
    _assert_same(clean, _snapshot(tmp_path / "oom"), "MemoryError")


_DIE = (
    _FAST
    + """
import os, signal, sys
import featcache.extract.pipeline as ex
real = ex.Images.__getitem__
def die(self, i):
    if i == 3:
        os.kill(os.getpid(), signal.SIGKILL)  # as the kernel does at a memory or file-size limit
    return real(self, i)
ex.Images.__getitem__ = die
from featcache.errors import FeatcacheError
try:
    ex.extract(ex.ExtractConfig(model="random:dinov3-vits16", data=sys.argv[1], out=sys.argv[2], res=32,
                                workers=1, shard_rows=2, batch_size=2), progress=False)
except FeatcacheError as e:
    print("ERROR", type(e).__name__, e)
"""
)


def test_decode_worker_death_ends_the_run_with_an_error(reference, tmp_path):
    _, manifest, _, _ = reference
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run(
        [sys.executable, "-c", _DIE, str(manifest), str(tmp_path / "w")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "ERROR ExtractionAborted a decode worker died" in r.stdout, r.stdout + r.stderr
    assert "re-run to resume" in r.stdout


_CREATE = """
import sys, time
from featcache.store.manifest import read_manifest
from featcache.store.feature_store import ArraySpec, FeatureStore
m = read_manifest(sys.argv[1])
while time.time() < float(sys.argv[3]):
    pass
fs = FeatureStore(sys.argv[2], mode="a").create_set("m/x/32", m, {"cls": ArraySpec((4,))}, {"config": {"a": 1}})
print(fs.attrs["created"], fs.attrs["attrs_digest"])
"""


def test_eight_workers_creating_one_set_at_once_agree(reference, tmp_path):
    _, manifest, _, _ = reference
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for trial in range(3):
        out = tmp_path / f"race{trial}"
        start = time.time() + 3.0  # every process imported and spinning before anyone creates
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", _CREATE, str(manifest), str(out), str(start)],
                cwd=REPO,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(8)
        ]
        outs = [p.communicate(timeout=120) for p in procs]
        assert all(p.returncode == 0 for p in procs), [e for _, e in outs]
        assert len({o for o, _ in outs}) == 1  # all opened the one set that won
        store = FeatureStore(out)
        assert store.list_sets() == ["m/x/32"]
        assert store.open_checked(allow_partial=True).usable["pending"] == len(read_manifest(manifest))
        assert not list(out.rglob(f"{store_io.TMP_PREFIX}*"))


_RUN = (
    _FAST
    + """
import sys
from featcache.extract import ExtractConfig, extract
extract(ExtractConfig(model="random:dinov3-vits16", data=sys.argv[1], out=sys.argv[2], res=32, workers=0,
                      shard_rows=2, batch_size=2), progress=False)
"""
)


def test_real_process_exit_at_creation_commit_and_attributes(reference, tmp_path):
    _, manifest, events, clean = reference
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    picks = [events.index("create:publish") + 1, events.index("shard 1:status") + 1, len(events)]
    for at in picks:
        out = tmp_path / f"x{at}"
        r = subprocess.run(
            [sys.executable, "-c", _RUN, str(manifest), str(out)],
            cwd=REPO,
            env={**env, "FEATCACHE_FAULT_AT": str(at)},
            capture_output=True,
            timeout=120,
        )
        assert r.returncode == 137, r.stderr
        subprocess.run([sys.executable, "-c", _RUN, str(manifest), str(out)], cwd=REPO, env=env, check=True)
        _assert_same(clean, _snapshot(out), f"exit at {events[at - 1]}")


def test_mixed_num_shards_and_changed_shard_size_are_refused(reference, tmp_path):
    from featcache.store.locks import extraction_lock

    _, manifest, _, _ = reference
    out = tmp_path / "mix"
    extract(_cfg(manifest, out, num_shards=2, shard_index=0), progress=False)
    with pytest.raises(StoreError, match="rows per shard, not --shard-size 3"):
        extract(_cfg(manifest, out, shard_rows=3), progress=False)
    fs = FeatureStore(out).open_set()
    with extraction_lock(fs, 0, 2):
        with pytest.raises(StoreError, match="--num-shards 2 .* --num-shards 3"):
            with extraction_lock(fs, 1, 3):
                pass
    r = extract(_cfg(manifest, out, num_shards=2, shard_index=1), progress=False)
    assert r.pending == 0


@pytest.mark.parametrize("name", ["../../evil", "a/../b", "/", ".hidden/x", "a//b"])
def test_set_names_that_leave_the_store_are_refused(reference, tmp_path, name):
    _, manifest, _, _ = reference
    with pytest.raises(FeatcacheError, match="not a valid set name"):
        extract(_cfg(manifest, tmp_path / "c", name=name), progress=False)
    assert not (tmp_path / "evil").exists()


def test_lock_is_free_once_the_main_process_is_killed(reference, tmp_path):
    """An orphaned decode worker must not hold the set's lock (it closes its inherited copy)."""
    import signal

    from featcache.store.locks import extraction_lock

    _, manifest, _, _ = reference
    out = tmp_path / "orphan"
    extract(_cfg(manifest, out), progress=False)  # the set exists
    script = _RUN.replace("workers=0", "workers=2").replace("shard_rows=2", "shard_rows=2, retry_failed=True")
    script = script.replace("import sys", "import sys, time\nimport featcache.extract.pipeline as ex\n"
                            "real = ex.Images.__getitem__\n"
                            "ex.Images.__getitem__ = lambda self, i: (time.sleep(30), real(self, i))[1]")  # fmt: skip
    fs = FeatureStore(out, mode="a").open_set()
    fs.mark_pending([0, 1, 2])
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", script, str(manifest), str(out)], cwd=REPO, env=env)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # wait until the run holds the lock and its workers are up
        time.sleep(0.3)
        try:
            with extraction_lock(fs):
                continue
        except StoreError:
            break
    time.sleep(2.0)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    with extraction_lock(fs):  # at once: no orphan holds it
        pass


@pytest.mark.parametrize("damage", ["flip", "delete", "status254"])
def test_verify_repair_then_extract_is_bit_identical(reference, tmp_path, damage):
    from click.testing import CliRunner

    from cli import featcache

    _, manifest, _, clean = reference
    out = tmp_path / "rep"
    extract(_cfg(manifest, out), progress=False)
    set_dir = out / FeatureStore(out).list_sets()[0]
    if damage == "flip":
        chunk = set_dir / "cls" / "c" / "1" / "0"
        b = bytearray(chunk.read_bytes())
        b[5] ^= 1
        chunk.write_bytes(bytes(b))
    elif damage == "delete":
        (set_dir / "pooled" / "c" / "2" / "0").unlink()
    else:
        fs = FeatureStore(out, mode="a").open_set()
        fs._writable("status")[2:4] = np.array([1, 254], np.uint8)
    runner = CliRunner()
    r = runner.invoke(featcache, ["verify", str(out)])
    assert r.exit_code == 1 and ("shard" in r.output or "status outside" in r.output), r.output
    r = runner.invoke(featcache, ["verify", "--repair", str(out)])
    assert r.exit_code == 1 and "marked pending" in r.output, r.output
    again = extract(_cfg(manifest, out), progress=False)
    assert again.processed == SHARD  # exactly the damaged shard is redone
    r = runner.invoke(featcache, ["verify", str(out)])
    assert r.exit_code == 0 and r.output.strip().endswith(": ok"), r.output
    _assert_same(clean, _snapshot(out), f"repair after {damage}")
