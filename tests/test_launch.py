"""Scaling out: rank/world from options, torchrun and SLURM; shard balancing; threads; submitit arrays."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from featcache.errors import FeatcacheError
from featcache.extract.launch import (
    MIN_SHARD_ROWS,
    balance_shard_rows,
    default_threads,
    env_slice,
    resolve_slice,
)
from featcache.extract.slurm import parse_slurm_spec, slurm_layout

REPO = Path(__file__).resolve().parents[1]


# ---- rank and world: a hand-made table of launcher environments ----


@pytest.mark.parametrize(
    "env, world, rank, source",
    [
        ({}, 1, 0, "single"),
        ({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3"}, 8, 3, "torchrun"),
        ({"SLURM_PROCID": "2", "SLURM_NTASKS": "4"}, 4, 2, "slurm"),
        # 4 tasks in each of 32 array jobs: array task 5, task 2 -> 5 * 4 + 2
        (
            {
                "SLURM_PROCID": "2",
                "SLURM_NTASKS": "4",
                "SLURM_ARRAY_TASK_ID": "5",
                "SLURM_ARRAY_TASK_COUNT": "32",
                "SLURM_ARRAY_TASK_MIN": "0",
            },
            128,
            22,
            "slurm-array",
        ),
        # sbatch --array=1-10 (ids start at 1) with one task each
        (
            {"SLURM_ARRAY_TASK_ID": "10", "SLURM_ARRAY_TASK_COUNT": "10", "SLURM_ARRAY_TASK_MIN": "1"},
            10,
            9,
            "slurm-array",
        ),
        # sbatch --array=0-30:10 -> ids 0, 10, 20, 30
        (
            {
                "SLURM_ARRAY_TASK_ID": "20",
                "SLURM_ARRAY_TASK_COUNT": "4",
                "SLURM_ARRAY_TASK_MIN": "0",
                "SLURM_ARRAY_TASK_STEP": "10",
            },
            4,
            2,
            "slurm-array",
        ),
        # torchrun under srun: torchrun's global ranks win over SLURM's
        ({"RANK": "9", "WORLD_SIZE": "16", "SLURM_PROCID": "1", "SLURM_NTASKS": "2"}, 16, 9, "torchrun"),
    ],
)
def test_slice_from_the_environment(env, world, rank, source):
    ws = resolve_slice(None, None, env)
    assert (ws.world, ws.rank, ws.source) == (world, rank, source)


def test_options_win_over_launchers():
    env = {"RANK": "3", "WORLD_SIZE": "8"}
    ws = resolve_slice(2, 1, env)
    assert (ws.world, ws.rank, ws.source) == (2, 1, "options")
    ws = resolve_slice(8, None, env)  # --num-shards alone: the index from a launcher of that size
    assert (ws.world, ws.rank) == (8, 3)
    assert resolve_slice(1, None, {}).world == 1


@pytest.mark.parametrize(
    "num, idx, env, match",
    [
        (None, 1, {}, "needs --num-shards"),
        (4, None, {}, "without --shard-index"),
        (4, None, {"RANK": "1", "WORLD_SIZE": "2"}, "launcher says 2"),
        (2, 2, {}, r"--shard-index 2 must be in \[0, --num-shards 2\)"),
        (None, None, {"RANK": "x", "WORLD_SIZE": "2"}, "RANK='x' is not an integer"),
        (None, None, {"RANK": "4", "WORLD_SIZE": "4"}, r"in \[0, 4\)"),
    ],
)
def test_bad_slices_are_one_line_errors(num, idx, env, match):
    with pytest.raises(FeatcacheError, match=match):
        resolve_slice(num, idx, env)


def test_every_shard_has_exactly_one_worker():
    for world in (1, 3, 8):
        for n_shards in (1, 5, 17):
            got = sorted(s for r in range(world) for s in resolve_slice(world, r, {}).shards(n_shards))
            assert got == list(range(n_shards))


def test_env_slice_none_outside_launchers():
    assert env_slice({"PATH": "/bin"}) is None


# ---- shard balancing ----


@pytest.mark.parametrize("n, default, world", [(1000, 4096, 8), (100, 4096, 2), (5000, 4096, 2), (90, 64, 8)])
def test_balanced_shards_give_every_worker_work_when_possible(n, default, world):
    rows, note = balance_shard_rows(n, default, world)
    shards = -(-n // rows)
    if -(-n // min(default, n)) >= world:  # the default already gives everyone a shard: kept, nothing said
        assert rows == min(default, n) and note is None
    elif n >= world * MIN_SHARD_ROWS:
        assert shards >= world and rows >= MIN_SHARD_ROWS and "so that" in note
    else:
        assert rows == MIN_SHARD_ROWS and "nothing to do" in note
    assert rows <= max(default, 1)


def test_balance_hand_computed():
    assert balance_shard_rows(1000, 4096, 8) == (125, balance_shard_rows(1000, 4096, 8)[1])
    rows, note = balance_shard_rows(40, 4096, 8)  # 40 rows cannot make 8 shards of >= 16 rows
    assert rows == 16 and "3 shard(s)" in note and "5 worker(s) have nothing" in note
    assert balance_shard_rows(1000, 4096, 1) == (1000, None)


# ---- threads ----


def test_default_threads_never_oversubscribe():
    assert default_threads(1, cores=2) == 1
    assert default_threads(8, cores=16) == 8
    assert default_threads(8, cores=4) == 1
    assert default_threads(0, cores=4) == 4


# ---- submitit spec ----


def test_slurm_spec_parsing():
    spec = parse_slurm_spec("partition=gpu,gpus=8,array=32,time=240")
    assert spec == {"partition": "gpu", "gpus": 8, "array": 32, "time": 240}
    assert slurm_layout(spec) == (32, 8)
    assert slurm_layout(parse_slurm_spec("array=4")) == (4, 1)
    for bad, match in [("gpus=x", "integer"), ("foo=1", "unknown key"), ("partition", "key=value")]:
        with pytest.raises(FeatcacheError, match=match):
            parse_slurm_spec(bad)


# ---- end to end on a tiny manifest ----


@pytest.fixture
def manifest(tmp_path):
    rng = np.random.default_rng(0)
    img = tmp_path / "img"
    img.mkdir()
    rows = ["path,patient_id,split"]
    for i in range(40):
        Image.fromarray(rng.integers(0, 255, (24, 24), dtype=np.uint8)).save(img / f"{i}.png")
        rows.append(f"img/{i}.png,p{i},{'train' if i < 30 else 'test'}")
    path = tmp_path / "m.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


def _cfg(manifest, out, **kw):
    from featcache.extract import ExtractConfig

    base = dict(
        model="random:dinov3-vits16", data=str(manifest), out=str(out), res=32, workers=0, device="cpu"
    )
    return ExtractConfig(**{**base, **kw})


def test_torchrun_ranks_split_a_small_set_and_match_one_worker(tmp_path, manifest, monkeypatch, capsys):
    from featcache.extract import extract
    from featcache.store.feature_store import FeatureStore

    extract(_cfg(manifest, tmp_path / "one"), progress=False)
    results = []
    for rank in range(2):  # what torchrun --nproc_per_node 2 gives each rank
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        results.append(extract(_cfg(manifest, tmp_path / "two"), progress=False))
    err = capsys.readouterr().err
    assert err.count("so that 2 workers share them") == 1  # said once, by worker 0
    assert [r.shards_mine for r in results] == [2, 0] or all(r.shards_mine == 1 for r in results)
    assert all(r.processed == 20 for r in results) and results[1].pending == 0
    one = FeatureStore(tmp_path / "one").open_checked()
    two = FeatureStore(tmp_path / "two").open_checked()
    assert one.shard_rows == 40 and two.shard_rows == 20 and "2 workers" in two.attrs["shard_rows_choice"]
    # other shard sizes make other batches: equal up to float32 summation order
    np.testing.assert_allclose(one.read("cls"), two.read("cls"), rtol=0, atol=1e-4)
    assert two.attrs["threads"]["intra"] >= 1


def test_threads_are_set_recorded_and_restored(tmp_path, manifest):
    import torch

    from featcache.extract import extract
    from featcache.store.feature_store import FeatureStore

    before = torch.get_num_threads()
    r = extract(_cfg(manifest, tmp_path / "c", threads=1), progress=False)
    assert r.threads["intra"] == 1 and r.threads["source"] == "--threads"
    assert FeatureStore(tmp_path / "c").open_set().attrs["threads"]["intra"] == 1
    assert torch.get_num_threads() == before
    with pytest.raises(FeatcacheError, match="--threads 0"):
        extract(_cfg(manifest, tmp_path / "d", threads=0), progress=False)


def test_cpu_bf16_is_opt_in_recorded_and_close_to_float32(tmp_path, manifest):
    from featcache.extract import extract
    from featcache.extract.launch import cpu_bf16_support
    from featcache.store.feature_store import FeatureStore

    ok, _ = cpu_bf16_support()
    if not ok:
        with pytest.raises(FeatcacheError, match="bf16 matmul"):
            extract(_cfg(manifest, tmp_path / "b", dtype="bf16"), progress=False)
        return
    extract(_cfg(manifest, tmp_path / "f"), progress=False)
    extract(_cfg(manifest, tmp_path / "b", dtype="bf16"), progress=False)
    f, b = FeatureStore(tmp_path / "f").open_checked(), FeatureStore(tmp_path / "b").open_checked()
    assert f.record.compute_dtype == "float32"  # the default on CPU
    assert b.record.compute_dtype == "bfloat16" and b.attrs["cpu_bf16"]
    x, y = f.read("cls"), b.read("cls")
    assert np.abs(x - y).max() < 0.1 * np.abs(x).max()  # bf16 keeps ~3 significant digits
    assert np.abs(x - y).max() > 0  # it really ran in bf16


def test_python_dash_m_featcache_runs_the_cli():
    out = subprocess.run(
        [sys.executable, "-m", "featcache", "extract", "--help"], capture_output=True, text=True, cwd=REPO
    )
    assert out.returncode == 0 and "--num-shards" in out.stdout and "--threads" in out.stdout
    probes = subprocess.run(
        [sys.executable, "-m", "probes", "knn", "--help"], capture_output=True, text=True, cwd=REPO
    )
    assert (
        probes.returncode == 0
        and probes.stdout.startswith("Usage: probes knn")
        and "--search" in probes.stdout
    )


def test_submitit_local_array_fills_the_set(tmp_path, manifest):
    submitit = pytest.importorskip("submitit")
    from featcache.extract import extract
    from featcache.extract.slurm import submit_slurm
    from featcache.store.feature_store import FeatureStore

    spec = parse_slurm_spec("array=2,time=10")
    jobs = submit_slurm(
        _cfg(manifest, tmp_path / "s", shard_rows=10), spec, str(tmp_path / "logs"), cluster="debug"
    )
    results = [j.result() for j in jobs]
    assert isinstance(jobs[0], submitit.core.core.Job)
    assert sorted((r.rank, r.world) for r in results) == [(0, 2), (1, 2)]
    assert sum(r.processed for r in results) == 40
    extract(_cfg(manifest, tmp_path / "ref", shard_rows=10), progress=False)
    s, ref = FeatureStore(tmp_path / "s").open_checked(), FeatureStore(tmp_path / "ref").open_checked()
    np.testing.assert_array_equal(s.read("cls"), ref.read("cls"))
