"""A study plan: datasets x backbones x resolutions x probes, read from one TOML file.

``featcache study run plan.toml`` extracts what is missing, runs every probe and writes the
report; ``featcache study plan plan.toml --dry-run`` lists the steps and their GPU cost. This
module reads and checks the plan and expands it into steps; the cost is in
:mod:`featcache.study.cost`, the runner is :mod:`probes.study_run`. It imports neither torch nor ``probes``.

Schema (relative paths are relative to the plan file's folder; see also docs/STUDY.md)::

    out = "study"                      # output folder: cache/, results.jsonl, report.md/.html
    backbones = ["dinov3-vitb16", "random:dinov2-vits14"]   # registry names, random:NAME, folders
    resolutions = [224, 512]
    features = ["cls", "pooled"]       # features probed (default ["cls"]), e.g. "layer_cls:-1"
    seed = 0                           # bootstrap / carve seed of every probe (default 0)
    n_boot = 1000                      # bootstrap draws (default 1000)
    uncertain = "ignore"               # uncertain-label policy: ignore, zeros, ones

    [extract]                          # optional; passed to `featcache extract`
    tokens = ["cls", "pooled"]         # default ["cls", "pooled"]
    layers = "last4"                   # intermediate layers (default: none)
    device = "auto"; dtype = "auto"; batch_size = 64; workers = 4; seed = 0   # seed of random: models

    [datasets.nih]                     # the dataset name starts every set name: nih/<model>/<res>
    manifest = "manifests/nih.csv"
    root = "/data/nih"                 # default: the manifest's folder
    labels = ["Effusion", "Mass"]      # optional: the declared label columns (also the probed ones)

    [probes.knn]                       # each probe table is optional; at least one is needed
    k = [10, 20, 100, 200]             # default; temperature = 0.07
    [probes.logreg]
    C_grid = [1e-2, 1e-1, 1, 10]       # selected on val (default 1e-6..1e5); or C = 1.0 (fixed)
    [probes.fewshot]
    shots = [1, 2, 4, 8, 16]           # default; seeds = 10 (count) or a list
    head = ["logreg", "prototype"]     # one run per head (default "logreg"); C = 1.0, k = 20

One probe run (a *step*) is one (dataset, backbone, resolution, features, probe, head). Its key
is a digest of the set name, the manifest digest, the model, the resolution, the features, the
probe's settings and the seed (:func:`step_key`); the runner writes it into every result row as
``params.study_step`` and skips a step whose key is already in the results file, so a killed
study resumes where it stopped and ends with the same rows as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from featcache.errors import FeatcacheError

__all__ = [
    "Extraction",
    "ProbeStep",
    "StudyError",
    "StudyPlan",
    "load_plan",
    "gflops_per_image",
    "plan_steps",
    "step_key",
]


_DEFAULTS = {
    "knn": {"k": [10, 20, 100, 200], "temperature": 0.07},
    "logreg": {},
    "fewshot": {
        "shots": [1, 2, 4, 8, 16],
        "seeds": 10,
        "head": "logreg",
        "C": 1.0,
        "k": 20,
        "temperature": 0.07,
    },
}
_ALLOWED = {
    "knn": {"k", "temperature"},
    "logreg": {"C", "C_grid", "val_fraction"},
    "fewshot": {"shots", "seeds", "head", "C", "k", "temperature"},
}
_TOP = {
    "out",
    "backbones",
    "resolutions",
    "features",
    "seed",
    "n_boot",
    "uncertain",
    "extract",
    "datasets",
    "probes",
}
_EXTRACT = {"tokens", "layers", "device", "dtype", "batch_size", "workers", "seed", "patch_pool", "resize"}
_DATASET = {"manifest", "root", "labels"}


class StudyError(FeatcacheError):
    """The study plan is malformed, or a step cannot be run (the plan key or set is named).

    Attributes:
        commands: shell commands that would fix it (``featcache extract ...`` lines), if any.
    """

    def __init__(self, message: str, commands: list[str] | None = None):
        super().__init__(message)
        self.commands = list(commands or [])


@dataclass(frozen=True)
class Dataset:
    """One dataset of a plan: ``name`` (first part of its set names), ``manifest`` CSV, image
    ``root`` (None: the manifest's folder), declared ``labels`` (None: inferred)."""

    name: str
    manifest: Path
    root: Path | None = None
    labels: tuple[str, ...] | None = None


@dataclass
class StudyPlan:
    """A parsed plan (see the module docstring for the TOML schema).

    Attributes:
        source: the plan file.
        out: output folder; ``cache``, ``results`` and ``report`` live in it.
        datasets: the datasets, in file order.
        backbones: model names, in file order.
        resolutions: input sizes in pixels.
        features: features probed.
        probes: probe name -> settings (defaults filled in), in the order knn, logreg, fewshot.
        seed: seed of every probe run (bootstrap, carve, folds).
        n_boot: bootstrap draws.
        uncertain: uncertain-label policy.
        extract: ``featcache extract`` settings (tokens, layers, device, dtype, batch_size, workers, seed).
    """

    source: Path
    out: Path
    datasets: list[Dataset]
    backbones: list[str]
    resolutions: list[int]
    features: list[str] = field(default_factory=lambda: ["cls"])
    probes: dict[str, dict[str, Any]] = field(default_factory=dict)
    seed: int = 0
    n_boot: int = 1000
    uncertain: str = "ignore"
    extract: dict[str, Any] = field(default_factory=dict)

    @property
    def cache(self) -> Path:
        """The feature store folder: ``<out>/cache``."""
        return self.out / "cache"

    @property
    def results(self) -> Path:
        """The results file: ``<out>/results.jsonl``."""
        return self.out / "results.jsonl"


@dataclass(frozen=True)
class Extraction:
    """One feature set the study needs: (dataset, backbone, resolution).

    Attributes:
        dataset, model, res: what it embeds.
        set_name: ``<dataset>/<model, path-safe>/<res>``.
        n_images: manifest rows.
        gflops_per_image: forward GFLOP per image (None: unknown, e.g. a local checkpoint folder).
        command: the ``featcache extract`` command line that makes it.
        digests: manifest digests a current set may hold (the declared-labels reading, and the
            inferred one for an extraction that does not take declared labels).
    """

    dataset: str
    model: str
    res: int
    set_name: str
    n_images: int
    gflops_per_image: float | None
    command: str
    digests: tuple[str, ...] = ()

    @property
    def gflops(self) -> float | None:
        """GFLOP of the whole pass (images x per-image cost)."""
        return None if self.gflops_per_image is None else self.gflops_per_image * self.n_images


@dataclass(frozen=True)
class ProbeStep:
    """One probe run of the study.

    Attributes:
        extraction: the feature set it reads.
        probe: ``knn``, ``logreg`` or ``fewshot``.
        features: features probed.
        settings: the probe's keyword arguments (``k``, ``C_grid``, ``shots``, ``head`` ...).
        key: :func:`step_key` of the step (16 hex digits).
    """

    extraction: Extraction
    probe: str
    features: str
    settings: dict[str, Any]
    key: str

    def describe(self) -> str:
        """One line: probe, set, features and settings."""
        shown = " ".join(f"{k}={_short(v)}" for k, v in self.settings.items())
        return f"{self.probe:8} {self.extraction.set_name}  features={self.features}  {shown}".rstrip()


def _short(v: Any) -> str:
    if isinstance(v, list):
        return ",".join(str(x) for x in v) if len(v) <= 6 else f"{v[0]},...,{v[-1]} ({len(v)})"
    return str(v)


def _fail(source: Path, what: str) -> StudyError:
    return StudyError(f"{source}: {what}")


def _int_list(source: Path, key: str, value: Any, *, positive: bool = True) -> list[int]:
    items = value if isinstance(value, list) else [value]
    if not items or not all(
        isinstance(v, int) and not isinstance(v, bool) and (v > 0 or not positive) for v in items
    ):
        raise _fail(source, f"'{key}' must be a positive integer or a list of them, got {value!r}")
    return [int(v) for v in items]


def _str_list(source: Path, key: str, value: Any) -> list[str]:
    items = value if isinstance(value, list) else [value]
    if not items or not all(isinstance(v, str) and v.strip() for v in items):
        raise _fail(source, f"'{key}' must be a non-empty string or a list of them, got {value!r}")
    return [v.strip() for v in items]


def _unknown(source: Path, where: str, got: dict, allowed: set[str]) -> None:
    extra = sorted(set(got) - allowed)
    if extra:
        raise _fail(source, f"unknown keys {extra} in {where} (allowed: {sorted(allowed)})")


def _path(base: Path, text: Any, source: Path, key: str) -> Path:
    if not isinstance(text, str) or not text.strip():
        raise _fail(source, f"'{key}' must be a path, got {text!r}")
    p = Path(os.path.expanduser(text))
    return p if p.is_absolute() else base / p


def _probe_settings(source: Path, name: str, raw: Any) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise _fail(source, f"[probes.{name}] must be a table")
    _unknown(source, f"[probes.{name}]", raw, _ALLOWED[name])
    s = {**_DEFAULTS[name], **raw}
    where = f"probes.{name}"
    if "k" in s:
        s["k"] = (
            _int_list(source, f"{where}.k", s["k"])
            if name == "knn"
            else _int_list(source, f"{where}.k", s["k"])[0]
        )
    if name == "fewshot":
        s["shots"] = _int_list(source, f"{where}.shots", s["shots"])
        seeds = s["seeds"]
        s["seeds"] = (
            seeds if isinstance(seeds, int) else _int_list(source, f"{where}.seeds", seeds, positive=False)
        )
        s["head"] = _str_list(source, f"{where}.head", s["head"])
        bad = [h for h in s["head"] if h not in ("logreg", "knn", "prototype")]
        if bad:
            raise _fail(source, f"{where}.head {bad}: use logreg, knn or prototype")
    if name == "logreg":
        if "C" in s and "C_grid" in s:
            raise _fail(source, f"[{where}] has both C and C_grid: a fixed C, or a grid selected on val")
        if "C_grid" in s:
            grid = s["C_grid"]
            if (
                not isinstance(grid, list)
                or not grid
                or not all(isinstance(c, int | float) and c > 0 for c in grid)
            ):
                raise _fail(source, f"{where}.C_grid must be a list of positive numbers, got {grid!r}")
            s["C_grid"] = [float(c) for c in grid]
    for key in ("C", "temperature", "val_fraction"):
        if key in s:
            if not isinstance(s[key], int | float) or isinstance(s[key], bool) or s[key] <= 0:
                raise _fail(source, f"{where}.{key} must be a positive number, got {s[key]!r}")
            s[key] = float(s[key])
    return s


def gflops_per_image(model: str, res: int) -> float | None:
    """Forward GFLOP per image of ``model`` (``random:NAME`` costs as NAME); None: not in the registry."""
    from featcache.models import REGISTRY, model_flops

    name = model[len("random:") :] if model.startswith("random:") else model
    if name not in REGISTRY:
        return None
    return float(model_flops(REGISTRY.get(name), res))


def load_plan(path: str | os.PathLike) -> StudyPlan:
    """Read and check a study plan TOML file (schema: the module docstring).

    Args:
        path: the ``.toml`` file.

    Returns:
        The ``StudyPlan``, relative paths resolved against the plan's folder.

    Raises:
        StudyError: a missing file, invalid TOML, unknown or mistyped keys (named).
    """
    source = Path(path)
    if not source.is_file():
        raise StudyError(f"{source}: study plan not found; pass the plan's .toml file")
    try:
        raw = tomllib.loads(source.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise _fail(source, f"not valid TOML ({' '.join(str(e).split())[:160]})") from None
    base = source.resolve().parent
    _unknown(source, "the plan", raw, _TOP)
    for key in ("datasets", "backbones", "resolutions", "probes"):
        if key not in raw:
            raise _fail(source, f"no '{key}' (see docs/STUDY.md for the schema)")
    if not isinstance(raw["datasets"], dict) or not raw["datasets"]:
        raise _fail(source, "[datasets] must hold at least one [datasets.NAME] table")
    datasets = []
    for name, d in raw["datasets"].items():
        if not isinstance(d, dict) or "manifest" not in d:
            raise _fail(source, f"[datasets.{name}] needs a 'manifest' path")
        if not name or "/" in name or name.startswith("."):
            raise _fail(source, f"dataset name {name!r} must be a plain name (it starts the set names)")
        _unknown(source, f"[datasets.{name}]", d, _DATASET)
        labels = d.get("labels")
        datasets.append(
            Dataset(
                name=name,
                manifest=_path(base, d["manifest"], source, f"datasets.{name}.manifest"),
                root=_path(base, d["root"], source, f"datasets.{name}.root") if "root" in d else None,
                labels=None
                if labels is None
                else tuple(_str_list(source, f"datasets.{name}.labels", labels)),
            )
        )
    backbones = _str_list(source, "backbones", raw["backbones"])
    if len(set(backbones)) != len(backbones):
        raise _fail(source, f"'backbones' repeats a model: {backbones}")
    resolutions = sorted(set(_int_list(source, "resolutions", raw["resolutions"])))
    probes_raw = raw["probes"]
    if not isinstance(probes_raw, dict) or not probes_raw:
        raise _fail(
            source,
            "[probes] must hold at least one of [probes.knn], [probes.logreg], [probes.fewshot]",
        )
    _unknown(source, "[probes]", probes_raw, set(_DEFAULTS))
    probes = {n: _probe_settings(source, n, probes_raw[n]) for n in _DEFAULTS if n in probes_raw}
    extract = raw.get("extract", {})
    if not isinstance(extract, dict):
        raise _fail(source, "[extract] must be a table")
    _unknown(source, "[extract]", extract, _EXTRACT)
    extract = {"tokens": ["cls", "pooled"], "seed": 0, **extract}
    extract["tokens"] = _str_list(source, "extract.tokens", extract["tokens"])
    for key in ("seed", "n_boot"):
        if key in raw and (not isinstance(raw[key], int) or isinstance(raw[key], bool) or raw[key] < 0):
            raise _fail(source, f"'{key}' must be a non-negative integer, got {raw[key]!r}")
    uncertain = raw.get("uncertain", "ignore")
    if uncertain not in ("ignore", "zeros", "ones"):
        raise _fail(source, f"'uncertain' must be ignore, zeros or ones, got {uncertain!r}")
    return StudyPlan(
        source=source,
        out=_path(base, raw.get("out", "study"), source, "out"),
        datasets=datasets,
        backbones=backbones,
        resolutions=resolutions,
        features=_str_list(source, "features", raw.get("features", ["cls"])),
        probes=probes,
        seed=int(raw.get("seed", 0)),
        n_boot=int(raw.get("n_boot", 1000)),
        uncertain=uncertain,
        extract=extract,
    )


def set_name(dataset: str, model: str, res: int) -> str:
    """``<dataset>/<model>/<res>`` with the model made path-safe (as ``featcache extract`` names it)."""
    part = Path(model).name if os.path.isdir(model) else model
    return f"{dataset}/{part.replace(':', '-').replace('/', '_')}/{res}"


def step_key(fields: dict[str, Any]) -> str:
    """16 hex digits of SHA-256 over a step's identity (sorted JSON): equal keys, same result rows.

    Args:
        fields: ``set_name, manifest_digest, model, res, features, probe, settings, seed`` and the
            probe-time options (``uncertain``, ``labels``, ``n_boot``).
    """
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def _extract_command(plan: StudyPlan, d: Dataset, model: str, res: int, name: str) -> str:
    args = ["featcache", "extract", "--model", model, "--res", str(res), "--data", str(d.manifest)]
    if d.root is not None:
        args += ["--root", str(d.root)]
    args += ["--out", str(plan.cache), "--name", name, "--tokens", ",".join(plan.extract["tokens"])]
    if d.labels is not None:
        args += ["--labels", ",".join(d.labels)]
    for key in ("layers", "device", "dtype", "batch_size", "workers", "patch_pool", "resize"):
        if key in plan.extract:
            args += [f"--{key.replace('_', '-')}", str(plan.extract[key])]
    if model.startswith("random:"):
        args += ["--seed", str(plan.extract["seed"])]
    return shlex.join(args)


def plan_steps(plan: StudyPlan) -> tuple[list[Extraction], list[ProbeStep]]:
    """Expand a plan into its feature sets and probe runs, in run order.

    Order: dataset, backbone, resolution (one extraction each), then features, probe, head.
    Manifests are read (declared labels applied, files not checked: extraction checks them).

    Returns:
        ``(extractions, steps)``.

    Raises:
        StudyError: a model's FLOP cost cannot be computed for a known model, a manifest is bad.
    """
    from featcache.store.manifest import read_manifest

    extractions, steps = [], []
    for d in plan.datasets:
        m = read_manifest(d.manifest, d.root, check_files=False, labels=d.labels)
        digest = m.digest()
        digests = (digest,)
        if d.labels is not None:
            try:
                digests += (read_manifest(d.manifest, d.root, check_files=False).digest(),)
            except FeatcacheError:
                pass
        for model in plan.backbones:
            for res in plan.resolutions:
                name = set_name(d.name, model, res)
                ext = Extraction(
                    dataset=d.name, model=model, res=res, set_name=name, n_images=len(m),
                    gflops_per_image=gflops_per_image(model, res), command=_extract_command(plan, d, model, res, name),
                    digests=digests,
                )  # fmt: skip
                extractions.append(ext)
                for features in plan.features:
                    for probe, settings in plan.probes.items():
                        heads = settings["head"] if probe == "fewshot" else [None]
                        for head in heads:
                            s = dict(settings)
                            if head is not None:
                                s["head"] = head
                            key = step_key(
                                {
                                    "set_name": name, "manifest_digest": digest, "model": model, "res": res,
                                    "features": features, "probe": probe, "settings": s, "seed": plan.seed,
                                    "uncertain": plan.uncertain, "n_boot": plan.n_boot,
                                    "labels": None if d.labels is None else list(d.labels),
                                }
                            )  # fmt: skip
                            steps.append(ProbeStep(ext, probe, features, s, key))
    return extractions, steps
