"""Few-shot probes: patient-level episode sampling and heads fitted on all episodes at once.

Sampling (``sample_episodes``), on the train rows given:

- A patient is one shot: K patients are drawn without replacement, then one image of each
  drawn patient at random (among its images carrying the drawn target), so no patient is in
  a support set twice and the support holds exactly K images per side or class.
- Multi-label: one binary episode per label with K positive and K negative patients. A patient
  is positive for a label if any of its images is positive; negatives are drawn from patients
  with at least one image labelled 0 and none positive. Missing (NaN) images are never drawn.
- Multi-class: one episode per (shots, seed) with K patients per class, drawn class by class
  in index order; a patient drawn for one class is not eligible for later classes.
- Reproducible: the draws of a binary episode come from ``numpy.random.default_rng(
  numpy.random.SeedSequence([seed, shots, zlib.crc32(name.encode("utf-8"))]))`` where ``name`` is
  the label's name (``label_names[j]``; the column index as a string, e.g. ``"3"``, when no names
  are given). An episode therefore depends only on (label name, K, seed) and the train rows: never
  on which other shots, seeds or labels were asked for, nor on their order or the label's column
  position. Patients are drawn from the label's positive and negative pools in patient-id order
  and images in row order, so dropping rows that carry none of the label's values changes nothing.
  Multi-class: ``[seed, shots]`` (one episode holds every class).
- Too few patients for K is an error naming the label (or class) and the count, never a skip.

Heads (``fewshot_scores``), each fitted and scored for all episodes together:

- ``"logreg"``: L2-regularised logistic regression, default ``C = 1.0`` (scikit-learn's
  default, the few-shot practice of Tian et al. 2020, "Rethinking few-shot image
  classification") on centred then L2-normalised features (centre: the mean of all train rows
  given). There is no validation set to tune C with K shots. Binary episodes are solved together
  by Newton's method in the span of each support set (one (2K + 1)-sized linear system per
  episode and step); multi-class episodes by a batched multinomial L-BFGS (one L-BFGS state per
  episode, shared matrix products). Scores are probabilities.
- ``"knn"``: the KNNProbe vote (cosine on L2-normalised features, ``exp(sim / T)`` weights),
  ``k`` capped at the support size.
- ``"prototype"``: SimpleShot (Wang et al. 2019): features centred with the mean of all train
  rows given (SimpleShot's base-train mean), L2-normalised; each class is represented by the
  mean of its support features; scores are ``softmax(cosine(x, class mean) / T)`` over the
  episode's classes (binary: ``sigmoid((cos_pos - cos_neg) / T)``, ranked as the cosine
  difference).

Example:
    >>> eps = sample_episodes(pid_train, Y_train, shots=[1, 2, 4], seeds=5, task="multilabel")
    >>> S = fewshot_scores(X_train, eps, X_test, head="logreg")   # [len(eps), n_test]
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy.special import expit
from threadpoolctl import threadpool_limits

from featcache.errors import FeatcacheError
from featcache.progress import probe_progress
from probes.estimators._lbfgs import fit_binary_newton_dual, fit_multinomial_lbfgs
from probes.estimators._linalg import (
    check_features,
    check_targets,
    check_task,
    knn_vote,
    l2_normalize,
    multinomial_proba,
)

HEADS = ("logreg", "knn", "prototype")

# Test rows scored per matrix product; bounds the [block, episodes] intermediates.
_TEST_BLOCK = 2048


@dataclass(eq=False)
class Episode:
    """One few-shot support set.

    Attributes:
        label: label column index (binary episode of a multi-label task), or None for a
            multi-class episode.
        shots: K, patients per side (binary) or per class (multi-class).
        seed: the seed it was drawn with.
        support: int64 [n] row indices into the train rows given to ``sample_episodes``
            (n = 2K binary, K * C multi-class).
        targets: int64 [n] support targets: 1/0 (binary) or class indices.
    """

    label: int | None
    shots: int
    seed: int
    support: np.ndarray = field(repr=False)
    targets: np.ndarray = field(repr=False)

    def __post_init__(self):
        self.support = np.asarray(self.support, dtype=np.int64)
        self.targets = np.asarray(self.targets, dtype=np.int64)

    def to_dict(self) -> dict:
        """JSON-ready form: ``{"label", "shots", "seed", "support", "targets"}`` with plain ints."""
        return {
            "label": None if self.label is None else int(self.label),
            "shots": int(self.shots),
            "seed": int(self.seed),
            "support": self.support.tolist(),
            "targets": self.targets.tolist(),
        }

    @classmethod
    def from_dict(cls, d: dict) -> Episode:
        """Inverse of ``to_dict``."""
        return cls(d["label"], d["shots"], d["seed"], d["support"], d["targets"])


def _seeds(seeds: Sequence[int] | int) -> list[int]:
    out = list(range(int(seeds))) if np.isscalar(seeds) else [int(s) for s in seeds]
    if not out or any(s < 0 for s in out):
        raise FeatcacheError(f"seeds must be non-negative integers (or a count); got {seeds!r}")
    return out


def _shots(shots: Sequence[int] | int) -> list[int]:
    out = [int(shots)] if np.isscalar(shots) else [int(k) for k in shots]
    if not out or any(k < 1 for k in out):
        raise FeatcacheError(f"shots must be positive integers; got {shots!r}")
    return out


def label_stream(name: str) -> int:
    """The label's part of a binary episode's seed: CRC-32 of its UTF-8 name (int in [0, 2**32))."""
    return zlib.crc32(str(name).encode("utf-8"))


def sample_episodes(
    patient_ids: np.ndarray,
    Y: np.ndarray,
    shots: Sequence[int] | int,
    seeds: Sequence[int] | int,
    task: str = "multilabel",
    labels: Sequence[int] | None = None,
    label_names: Sequence[str] | None = None,
) -> list[Episode]:
    """Draw patient-level few-shot episodes from the train rows.

    Args:
        patient_ids: str [N] patient of each train row.
        Y: float32 [N, L] multi-label targets (1/0/NaN, uncertain already mapped) or int64 [N]
            class indices (-1 missing).
        shots: K values, e.g. ``range(1, 17)``.
        seeds: seed values, or a count n meaning seeds ``0 .. n-1``.
        task: ``"multilabel"`` or ``"multiclass"``.
        labels: multi-label only: the label columns to sample (default: all).
        label_names: names of the label columns (multi-label) or classes (multi-class): a binary
            episode's random stream is seeded from its label's name (see the module docstring),
            and errors name it.

    Returns:
        Episodes ordered by shots, then seed, then label.

    Raises:
        FeatcacheError: fewer eligible patients than K for a label or class (the message names
            it and gives the count), an empty patient id, or bad targets.
    """
    check_task(task)
    pids = np.asarray(patient_ids).astype(str)
    if pids.ndim != 1:
        raise FeatcacheError(f"patient_ids must be a 1-D array; got shape {pids.shape}")
    Y = check_targets(Y, task, pids.shape[0], "Y")
    empty = np.flatnonzero(pids == "")
    if empty.size:
        raise FeatcacheError(
            f"{empty.size} train rows have no patient id (first row {int(empty[0])}): give every row a "
            "patient_id (an image's own id when patients are unknown)"
        )
    shots, seeds = _shots(shots), _seeds(seeds)
    _, pidx = np.unique(pids, return_inverse=True)
    n_pat = int(pidx.max()) + 1
    order = np.argsort(pidx, kind="stable")
    bounds = np.searchsorted(pidx[order], np.arange(n_pat + 1))

    def name(j: int, kind: str) -> str:
        given = f"{label_names[j]!r} " if label_names is not None else ""
        return f"{kind} {given}({'column' if kind == 'label' else 'index'} {j})"

    def pick_images(rng, patients, values, target):
        rows = []
        for p in patients:
            own = order[bounds[p] : bounds[p + 1]]
            cand = own[values[own] == target]
            rows.append(cand[rng.integers(cand.size)])
        return rows

    kmax = max(shots)
    episodes = []
    if task == "multilabel":
        cols = list(range(Y.shape[1])) if labels is None else [int(j) for j in labels]
        if any(not 0 <= j < Y.shape[1] for j in cols):
            raise FeatcacheError(f"labels {list(labels)} must be column indices in 0..{Y.shape[1] - 1}")
        streams = {j: label_stream(label_names[j] if label_names is not None else str(j)) for j in cols}
        pools = {}
        for j in cols:
            pos = np.bincount(pidx, weights=Y[:, j] == 1, minlength=n_pat) > 0
            neg = (np.bincount(pidx, weights=Y[:, j] == 0, minlength=n_pat) > 0) & ~pos
            for side, pool in (("positive", pos), ("negative", neg)):
                if pool.sum() < kmax:
                    raise FeatcacheError(
                        f"{name(j, 'label')} has {int(pool.sum())} {side} patients among the train rows; "
                        f"{kmax}-shot episodes need {kmax}: lower the shots or drop the label"
                    )
            pools[j] = (np.flatnonzero(pos), np.flatnonzero(neg))
        for k in shots:
            for seed in seeds:
                for j in cols:
                    rng = np.random.default_rng(np.random.SeedSequence([seed, k, streams[j]]))
                    pos, neg = pools[j]
                    chosen_pos = rng.choice(pos, k, replace=False)
                    chosen_neg = rng.choice(neg, k, replace=False)
                    rows = pick_images(rng, chosen_pos, Y[:, j], 1) + pick_images(rng, chosen_neg, Y[:, j], 0)
                    episodes.append(Episode(j, k, seed, rows, [1] * k + [0] * k))
        return episodes

    n_classes = int(Y.max()) + 1 if (Y >= 0).any() else 0
    if n_classes < 2:
        raise FeatcacheError("the train rows hold fewer than two classes: few-shot needs at least two")
    has = np.zeros((n_pat, n_classes), dtype=bool)
    known = Y >= 0
    has[pidx[known], Y[known]] = True
    for c in range(n_classes):
        if has[:, c].sum() < kmax:
            raise FeatcacheError(
                f"{name(c, 'class')} has {int(has[:, c].sum())} patients among the train rows; "
                f"{kmax}-shot episodes need {kmax}: lower the shots or drop the class"
            )
    for k in shots:
        for seed in seeds:
            rng = np.random.default_rng(np.random.SeedSequence([seed, k]))
            used = np.zeros(n_pat, dtype=bool)
            rows, targets = [], []
            for c in range(n_classes):
                pool = np.flatnonzero(has[:, c] & ~used)
                if pool.size < k:
                    raise FeatcacheError(
                        f"{name(c, 'class')} has {pool.size} patients left after earlier classes took theirs "
                        f"(seed {seed}); {k}-shot episodes need {k}: lower the shots"
                    )
                chosen = rng.choice(pool, k, replace=False)
                used[chosen] = True
                rows += pick_images(rng, chosen, Y, c)
                targets += [c] * k
            episodes.append(Episode(None, k, seed, rows, targets))
    return episodes


def _groups(episodes: list[Episode]) -> dict[int, np.ndarray]:
    """Episode positions grouped by support size, so each group stacks into dense arrays."""
    sizes = np.array([e.support.size for e in episodes])
    return {int(n): np.flatnonzero(sizes == n) for n in np.unique(sizes)}


def _check_episodes(episodes: list[Episode], n_train: int) -> tuple[bool, int]:
    if not episodes:
        raise FeatcacheError("no episodes given: sample them with sample_episodes first")
    binary = episodes[0].label is not None
    n_classes = 2 if binary else max(int(e.targets.max()) for e in episodes) + 1
    for i, e in enumerate(episodes):
        if (e.label is not None) != binary:
            raise FeatcacheError(f"episode {i} mixes binary and multi-class episodes: score them separately")
        if e.support.size == 0 or e.support.size != e.targets.size:
            raise FeatcacheError(
                f"episode {i} has {e.support.size} support rows and {e.targets.size} targets"
            )
        if e.support.min() < 0 or e.support.max() >= n_train:
            raise FeatcacheError(f"episode {i} refers to rows outside the {n_train} train rows given")
        if np.unique(e.targets).size != n_classes or e.targets.min() < 0 or e.targets.max() >= n_classes:
            raise FeatcacheError(
                f"episode {i} (label {e.label}, {e.shots} shots, seed {e.seed}) does not hold every one of "
                f"the {n_classes} classes in its support"
            )
    return binary, n_classes


def fewshot_scores(
    X_train: np.ndarray,
    episodes: list[Episode],
    X_test: np.ndarray,
    head: str = "logreg",
    *,
    C: float = 1.0,
    k: int = 20,
    temperature: float = 0.07,
    max_iter: int = 1000,
    ranking: bool = False,
) -> np.ndarray:
    """Fit a head on every episode's support and score the test rows, all episodes together.

    Args:
        X_train: float [N, D] the train rows the episodes index (all of them: their mean
            centres the features of the logreg and prototype heads).
        episodes: from ``sample_episodes`` (all binary or all multi-class).
        X_test: float [n, D] test rows.
        head: ``"logreg"``, ``"knn"`` or ``"prototype"``.
        C: logreg inverse regularisation strength.
        k: kNN neighbours, capped at each support's size.
        temperature: kNN and prototype softmax temperature.
        max_iter: logreg solver iterations at most.
        ranking: binary episodes only: return float32 scores that order each episode's test rows
            exactly as its probabilities do, for AUROC: the logit without the episode's intercept
            (logreg, prototype; a constant per episode, so the order is unchanged), the vote (kNN).
            Cheaper than the probabilities (no exp, half the memory) and free of the ties that
            float64 rounding makes among saturated probabilities. kNN votes are returned as they are.

    Returns:
        float64 [n_episodes, n_test] positive-class scores (binary episodes; float32 ranking
        scores with ``ranking``, float64 for kNN) or [n_episodes, n_test, C] class probabilities (multi-class).
    """
    if head not in HEADS:
        raise FeatcacheError(f"unknown few-shot head {head!r}: use one of {', '.join(HEADS)}")
    X_train = check_features(X_train, "X_train")
    X_test = check_features(X_test, "X_test")
    if X_test.shape[1] != X_train.shape[1]:
        raise FeatcacheError(f"X_test has {X_test.shape[1]} features, X_train {X_train.shape[1]}")
    binary, n_classes = _check_episodes(episodes, X_train.shape[0])
    if ranking and not binary:
        raise FeatcacheError(
            "ranking scores are for binary episodes; multi-class episodes give probabilities"
        )
    if head == "knn":
        return _knn_head(X_train, episodes, X_test, k, temperature, binary, n_classes)
    center = X_train.mean(0, dtype=np.float64).astype(np.float32)
    if head == "logreg":
        W, B = _logreg_head(X_train, episodes, center, C, max_iter, binary, n_classes)
    else:
        W, B = _prototype_head(X_train, episodes, center, temperature, binary, n_classes)
    return _score_linear(X_test, center, W, B, binary, ranking)


def _support(X_train, episodes, sel, center):
    """CL2N support features float32 [E, n, D] and targets int64 [E, n] of the episodes ``sel``."""
    idx = np.stack([episodes[i].support for i in sel])
    E, n = idx.shape
    return l2_normalize(X_train[idx.ravel()], center).reshape(E, n, -1), np.stack(
        [episodes[i].targets for i in sel]
    )


def _logreg_head(X_train, episodes, center, C, max_iter, binary, n_classes):
    """Weights float32 [E, D, C'] and intercepts float64 [E, C'] (binary: C' = 1, the logit)."""
    E, D = len(episodes), X_train.shape[1]
    width = 1 if binary else n_classes
    W = np.zeros((E, D, width), dtype=np.float32)
    B = np.zeros((E, width))
    bar = probe_progress(E, "few-shot logreg heads", unit="episodes")
    for _, sel in _groups(episodes).items():
        Xs, T = _support(X_train, episodes, sel, center)
        Xs = Xs.astype(np.float64)
        if binary:
            K = Xs @ Xs.transpose(0, 2, 1)
            # Thousands of tiny LAPACK solves: BLAS threads would only add start-up cost.
            with threadpool_limits(limits=1, user_api="blas"):
                alpha, b = fit_binary_newton_dual(K, T, C, max_iter=max_iter)
            W[sel, :, 0] = np.einsum("en,end->ed", alpha, Xs)
            B[sel, 0] = b
        else:
            theta = fit_multinomial_lbfgs(Xs, T, n_classes, C, max_iter=max_iter, tol=1e-8)
            W[sel] = theta[:, :D]
            B[sel] = theta[:, D]
        bar.update(len(sel))
    bar.close()
    return W, B


def _prototype_head(X_train, episodes, center, temperature, binary, n_classes):
    """Normalised class means / T as weights [E, D, C'], so the linear scorer gives SimpleShot scores.

    Binary: one column, (positive mean - negative mean) / T, whose sigmoid equals the softmax of
    the two cosines / T.
    """
    E, D = len(episodes), X_train.shape[1]
    W = np.zeros((E, D, 1 if binary else n_classes), dtype=np.float32)
    for _, sel in _groups(episodes).items():
        Xs, T = _support(X_train, episodes, sel, center)
        onehot = (T[..., None] == np.arange(n_classes)).astype(np.float32)
        means = np.einsum("enc,end->ecd", onehot, Xs)
        means = l2_normalize(means.reshape(-1, D)).reshape(len(sel), n_classes, D)
        if binary:
            W[sel, :, 0] = (means[:, 1] - means[:, 0]) / temperature
        else:
            W[sel] = means.transpose(0, 2, 1) / temperature
    return W, np.zeros((E, W.shape[2]))


def _score_linear(X_test, center, W, B, binary, ranking=False):
    """Scores of ``CL2N(X_test) @ W_e + B_e`` for all episodes e, one matrix product per test block.

    Returns float64 [E, n] sigmoid (binary) or [E, n, C] softmax (multi-class); with ``ranking``
    float32 [E, n] ``CL2N(X_test) @ W_e`` (binary).
    """
    E, D, width = W.shape
    n_test = X_test.shape[0]
    bar = probe_progress(n_test, f"few-shot scoring ({E} episodes)", unit="test rows")
    if ranking:
        out = np.empty((E, n_test), dtype=np.float32)
        rows = np.ascontiguousarray(W[:, :, 0])
        for start in range(0, n_test, _TEST_BLOCK):
            block = slice(start, start + _TEST_BLOCK)
            out[:, block] = rows @ l2_normalize(X_test[block], center).T
            bar.update(len(out[0, block]))
        bar.close()
        return out
    out = np.empty((E, n_test) if binary else (E, n_test, width))
    # Episodes as rows, test rows as columns: the product lands in ``out``'s layout, no transposes.
    rows = np.ascontiguousarray(W.transpose(0, 2, 1).reshape(E * width, D))
    for start in range(0, n_test, _TEST_BLOCK):
        block = slice(start, start + _TEST_BLOCK)
        Z = (rows @ l2_normalize(X_test[block], center).T).astype(np.float64)
        if binary:
            Z += B
            expit(Z, out=out[:, block])
        else:
            out[:, block] = multinomial_proba(Z.reshape(E, width, -1).transpose(0, 2, 1) + B[:, None, :])
        bar.update(Z.shape[-1])
    bar.close()
    return out


def _knn_head(X_train, episodes, X_test, k, temperature, binary, n_classes):
    if int(k) != k or k < 1:
        raise FeatcacheError(f"k must be a positive integer; got {k!r}")
    E, n_test = len(episodes), X_test.shape[0]
    out = np.empty((E, n_test) if binary else (E, n_test, n_classes))
    groups = _groups(episodes)
    bar = probe_progress(n_test * len(groups), f"few-shot kNN ({E} episodes)", unit="test rows")
    for n, sel in groups.items():
        idx = np.stack([episodes[i].support for i in sel])
        T = np.stack([episodes[i].targets for i in sel])
        rows, inv = np.unique(idx, return_inverse=True)
        inv = inv.reshape(idx.shape)
        XU = l2_normalize(X_train[rows])
        kk = min(int(k), n)
        # Keep the [block, episodes, n] similarity tensor near 4M entries.
        step = int(np.clip(2**22 // (len(sel) * n), 16, _TEST_BLOCK))
        for start in range(0, n_test, step):
            block = slice(start, start + step)
            S = (l2_normalize(X_test[block]) @ XU.T)[:, inv]
            top = np.argsort(-S, axis=-1, kind="stable")[..., :kk]
            sims = np.take_along_axis(S, top, axis=-1)
            tgt = np.take_along_axis(np.broadcast_to(T, S.shape), top, axis=-1)
            if binary:
                score = knn_vote(sims, tgt[..., None].astype(np.float64), [kk], temperature, "multilabel")[kk]
                out[sel, block] = score[..., 0].T
            else:
                out[sel, block] = knn_vote(sims, tgt, [kk], temperature, "multiclass", n_classes)[
                    kk
                ].transpose(1, 0, 2)
            bar.update(S.shape[0])
    bar.close()
    return out
