"""featcache core commands through the CLI: output, exit codes, one-line errors, documented help."""

from __future__ import annotations

import re

import click
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from cli import featcache, probes
from featcache.store.feature_store import FeatureStore
from featcache.store.manifest import write_manifest


@pytest.fixture
def data(tmp_path):
    for i in range(6):
        Image.fromarray(np.full((40, 40), 20 * i, np.uint8)).save(tmp_path / f"{i}.png")
    cols = {
        "path": [f"{i}.png" for i in range(6)],
        "patient_id": [f"p{i // 2}" for i in range(6)],
        "split": ["train", "train", "val", "val", "test", "test"],
        "effusion": [1.0, 0.0, 1.0, 0.0, 1.0, 0.0],
    }
    return write_manifest(tmp_path / "m.csv", cols)


def _run(group, args):
    return CliRunner().invoke(group, args, catch_exceptions=False)


def _extract(data, tmp_path, *extra):
    args = ["extract", "--model", "random:dinov3-vits16", "--res", "32", "--data", str(data)]
    return _run(featcache, [*args, "--out", str(tmp_path / "cache"), "--workers", "0", "--quiet", *extra])


def test_extract_ls_info_verify(data, tmp_path):
    r = _extract(data, tmp_path)
    assert r.exit_code == 0, r.output
    assert "m/random-dinov3-vits16/32: 6/6 rows done, 0 failed, 0 pending" in r.output
    r = _run(featcache, ["ls", str(tmp_path / "cache")])
    assert r.exit_code == 0 and re.search(r"m/random-dinov3-vits16/32\s+6\s+6\s+0", r.output)
    r = _run(featcache, ["info", str(tmp_path / "cache")])
    assert r.exit_code == 0
    assert "random:dinov3-vits16" in r.output and "bytes per image" in r.output and "cls" in r.output
    r = _run(featcache, ["verify", str(tmp_path / "cache")])
    assert r.exit_code == 0 and r.output.strip().endswith("ok")


def test_failed_rows_exit_3_and_verify_fails(data, tmp_path):
    (tmp_path / "2.png").write_bytes(b"broken")
    r = _extract(data, tmp_path)
    assert r.exit_code == 3
    assert "1 failed" in r.output and "failed: 2.png:" in r.output
    r = _run(featcache, ["verify", str(tmp_path / "cache")])
    assert r.exit_code == 1 and "1 row(s) failed" in r.output


@pytest.mark.parametrize(
    ("args", "expect"),
    [
        (["--model", "random:no-such-net"], "no-such"),
        (["--tokens", "cls,banana"], "banana"),
        (["--shard-index", "3", "--num-shards", "2"], "--shard-index 3"),
        (["--device", "cuda:7"], "cuda"),
    ],
)
def test_bad_options_give_one_line(data, tmp_path, args, expect):
    r = CliRunner().invoke(
        featcache,
        [
            "extract",
            "--model",
            "random:dinov3-vits16",
            "--res",
            "32",
            "--data",
            str(data),
            "--out",
            str(tmp_path / "c"),
        ]
        + args,
    )
    assert r.exit_code != 0
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:") and expect in lines[0], r.output
    assert r.exception is None or isinstance(r.exception, SystemExit)


def test_bad_manifest_one_line(tmp_path):
    (tmp_path / "m.csv").write_text("path,split\nnope.png,train\n")
    r = CliRunner().invoke(
        featcache,
        [
            "extract",
            "--model",
            "random:dinov3-vits16",
            "--data",
            str(tmp_path / "m.csv"),
            "--out",
            str(tmp_path / "c"),
        ],
    )
    assert r.exit_code == 1 and r.output.count("\n") == 1 and "nope.png" in r.output


def test_registry_name_without_weights_says_how_to_fetch(data, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    r = CliRunner().invoke(
        featcache, ["extract", "--model", "dinov3-vitb16", "--data", str(data), "--out", str(tmp_path / "c")]
    )
    assert r.exit_code == 1 and r.output.count("\n") == 1
    assert "facebook/dinov3-vitb16-pretrain-lvd1689m" in r.output


def test_models_wildcard():
    r = _run(featcache, ["models", "dinov3-vit*"])
    names = [ln.split()[0] for ln in r.output.splitlines()[1:]]
    assert "dinov3-vit7b16" in names and "dinov3-vitb16" in names and "dinov2-vitb14" not in names
    r = CliRunner().invoke(featcache, ["models", "nothing-like-this*"])
    assert r.exit_code == 1


def test_verify_missing_store(tmp_path):
    r = CliRunner().invoke(featcache, ["verify", str(tmp_path / "nowhere")])
    assert r.exit_code == 1 and "no feature store" in r.output


def test_store_is_readable_after_cli_extract(data, tmp_path):
    _extract(data, tmp_path, "--tokens", "cls,patch")
    fs = FeatureStore(tmp_path / "cache").open_set()
    assert fs.shape("patch") == (6, 2, 2, 384)


def _commands(group: click.Group, prefix: str):
    for name, cmd in group.commands.items():
        if isinstance(cmd, click.Group):
            yield from _commands(cmd, f"{prefix} {name}")
        else:
            yield f"{prefix} {name}", cmd


@pytest.mark.parametrize("group", [featcache, probes], ids=["featcache", "probes"])
def test_every_command_has_help_with_example(group):
    for path, cmd in _commands(group, group.name):
        assert cmd.help and "Example:" in cmd.help, f"{path} has no Example in its help"
        r = CliRunner().invoke(group, [*path.split()[1:], "--help"])
        assert r.exit_code == 0 and "Example:" in r.output, path


def test_resplit_manifest_reuses_the_features(data, tmp_path):
    assert _extract(data, tmp_path).exit_code == 0
    text = data.read_text().replace("val", "test")
    data.write_text(text)
    r = _extract(data, tmp_path)
    assert r.exit_code == 0 and "features kept" in r.output and "0 processed" in r.output
    assert FeatureStore(tmp_path / "cache").open_set().splits.tolist().count("test") == 4


def test_split_warns_when_shares_cannot_be_met(tmp_path):
    rows = {"path": [f"{i}.png" for i in range(40)], "meta_sex": ["M", "F"] * 20, "effusion": [1.0, 0.0] * 20}
    write_manifest(tmp_path / "m.csv", rows)
    r = CliRunner().invoke(
        featcache, ["split", str(tmp_path / "m.csv"), "--by", "meta_sex", "--out", str(tmp_path / "s.csv")]
    )
    assert r.exit_code == 0 and "warning: val holds 0.0% of the images, not 10%" in r.output


def test_a_commands_warnings_are_one_line(capsys):
    import warnings

    from featcache.cli_util import _one_line_warnings

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        _one_line_warnings()
        warnings.warn(
            "LogRegProbe: 1 of 36 grid fits stopped at max_iter\nsecond line", UserWarning, stacklevel=1
        )
    assert capsys.readouterr().err == "warning: LogRegProbe: 1 of 36 grid fits stopped at max_iter\n"
