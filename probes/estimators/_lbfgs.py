"""Batched logistic-regression solvers (numpy/scipy only, never torch).

One-vs-rest L-BFGS over all labels at once (optionally in scaled principal axes), multinomial
L-BFGS over many problems at once, and a batched Newton solve in the span of a tiny support set,
all on top of ``batched_lbfgs``, which runs many independent L-BFGS problems with one function
evaluation per step.

All solvers minimise scikit-learn's objective, ``C * sum(log_loss) + 0.5 * ||W||^2`` with an
unpenalised intercept, so their optimum is the one ``sklearn.linear_model.LogisticRegression``
reaches with the same ``C``. ``probes.estimators._linalg`` re-exports them.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy.special import expit, log_softmax


def batched_lbfgs(
    fun: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]],
    x0: np.ndarray,
    max_iter: int = 1000,
    tol: float = 1e-6,
    memory: int = 10,
    ftol: float = 64 * np.finfo(np.float64).eps,
    return_info: bool = False,
    gnorm: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
) -> np.ndarray | tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Minimise B independent smooth convex problems together, each with its own L-BFGS state.

    Every problem keeps its own curvature history, step length and stopping test, so it
    converges as a separate L-BFGS run would; only the function evaluations are batched, which
    turns B matrix-vector products into one matrix-matrix product.

    Step acceptance (backtracking from t = 1): the Armijo test, or, once objective differences
    are at rounding level, the approximate Wolfe test of Hager and Zhang (2005): the objective
    rises by at most ``1e-11 |f|`` and the slope along the step lies in ``[0.9, -0.8]`` times the
    initial slope. The second test lets the gradient keep shrinking after ``f`` can no longer
    resolve progress, which is what a tight gradient tolerance needs at weak regularisation.

    A problem stops when every entry of its gradient is at most ``tol`` (scipy's ``gtol``,
    the convergence test), after ``max_iter`` iterations, when its objective changes by under
    ``ftol`` relative (scipy's ``ftol`` as scikit-learn sets it; ``ftol=0`` disables this stop),
    or when the line search fails twice in a row (once the curvature memory is cleared).

    Args:
        fun: ``fun(x, rows) -> (f float64 [b], g float64 [b, P])`` evaluating the problems
            ``rows`` (int [b]) at ``x`` (float64 [b, P]).
        x0: float64 [B, P] starting points.
        max_iter: iterations at most.
        tol: gradient tolerance (max-norm).
        memory: curvature pairs kept.
        ftol: relative objective change under which a problem stops; 0 stops on the gradient,
            ``max_iter`` or line-search failure only.
        return_info: also return the iteration counts and convergence flags.
        gnorm: ``gnorm(g, rows) -> float64 [b]``, the size of gradients ``g`` [b, P] that is
            compared to ``tol`` (default: the max-norm); lets a reparametrised problem be
            stopped on the gradient of the original variables.

    Returns:
        float64 [B, P] solutions; with ``return_info``, ``(x, n_iter int64 [B], converged bool [B])``
        where ``converged`` means the gradient test was met.
    """
    x = np.array(x0, dtype=np.float64)
    B, P = x.shape
    everyone = np.arange(B)
    f, g = fun(x, everyone)
    S = np.zeros((memory, B, P))
    Yh = np.zeros((memory, B, P))
    rho = np.zeros((memory, B))
    gamma = 1.0 / np.maximum(np.linalg.norm(g, axis=1), 1.0)
    if gnorm is None:
        gnorm = lambda grad, rows: np.abs(grad).max(1)  # noqa: E731
    active = gnorm(g, everyone) > tol
    n_iter = np.zeros(B, dtype=np.int64)
    retried = np.zeros(B, dtype=bool)  # the last line search failed and the memory was cleared
    for it in range(max_iter):
        if not active.any():
            break
        n_iter += active
        # Two-loop recursion, newest pair first; skipped updates are zero pairs and drop out.
        q = g.copy()
        a = np.zeros((memory, B))
        slots = [(it - 1 - i) % memory for i in range(min(it, memory))]
        for j in slots:
            a[j] = rho[j] * np.einsum("bp,bp->b", S[j], q)
            q -= a[j][:, None] * Yh[j]
        d = gamma[:, None] * q
        for j in reversed(slots):
            beta = rho[j] * np.einsum("bp,bp->b", Yh[j], d)
            d += (a[j] - beta)[:, None] * S[j]
        d = -d
        gd = np.einsum("bp,bp->b", g, d)
        reset = gd >= 0
        if reset.any():
            d[reset], gd[reset] = -g[reset], -np.einsum("bp,bp->b", g[reset], g[reset])
            rho[:, reset] = 0.0
        x_new, f_new, g_new = x.copy(), f.copy(), g.copy()
        t = np.ones(B)
        trial = np.flatnonzero(active)
        for _ in range(60):
            xt = x[trial] + t[trial, None] * d[trial]
            ft, gt = fun(xt, trial)
            f0, gd0 = f[trial], gd[trial]
            slope = np.einsum("bp,bp->b", gt, d[trial])
            ok = (ft <= f0 + 1e-4 * t[trial] * gd0) | (
                (ft <= f0 + 1e-11 * np.abs(f0)) & (slope >= 0.9 * gd0) & (slope <= -0.8 * gd0)
            )
            done = trial[ok]
            x_new[done], f_new[done], g_new[done] = xt[ok], ft[ok], gt[ok]
            trial = trial[~ok]
            if trial.size == 0:
                break
            t[trial] *= 0.5
        stalled = np.zeros(B, dtype=bool)
        stalled[trial] = True
        s_vec, y_vec = x_new - x, g_new - g
        sy = np.einsum("bp,bp->b", s_vec, y_vec)
        yy = np.einsum("bp,bp->b", y_vec, y_vec)
        good = active & ~stalled & (sy > 1e-12 * np.sqrt(np.einsum("bp,bp->b", s_vec, s_vec) * yy))
        slot = it % memory
        S[slot], Yh[slot] = np.where(good[:, None], s_vec, 0.0), np.where(good[:, None], y_vec, 0.0)
        rho[slot] = np.where(good, 1.0 / np.where(good, sy, 1.0), 0.0)
        gamma = np.where(good, sy / np.where(good, yy, 1.0), gamma)
        # A failed line search clears that problem's memory and retries along -g once.
        give_up = stalled & retried
        rho[:, stalled] = 0.0
        retried = stalled
        small_change = (f - f_new) <= ftol * np.maximum(np.maximum(np.abs(f), np.abs(f_new)), 1.0)
        x, f, g = x_new, f_new, g_new
        active &= ~give_up & ~(small_change & ~stalled & (ftol > 0))
        live = np.flatnonzero(active)
        active[live] = gnorm(g[live], live) > tol
    if return_info:
        return x, n_iter, gnorm(g, everyone) <= tol
    return x


def fit_ovr_lbfgs(
    X: np.ndarray,
    Y: np.ndarray,
    C: np.ndarray,
    coef0: np.ndarray | None = None,
    max_iter: int = 1000,
    tol: float = 1e-6,
    ftol: float = 64 * np.finfo(np.float64).eps,
    return_info: bool = False,
    precondition: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Binary logistic regressions of every label on shared features, solved jointly.

    Each label minimises ``mean_i log_loss + ||w||^2 / (2 C n)`` over its known rows (n of them),
    scikit-learn's scaling of ``C * sum log_loss + 0.5 ||w||^2``. Each label runs its own L-BFGS
    (``batched_lbfgs``) while the evaluations of all labels share one pass over ``X``.

    Args:
        X: float64 [N, D] features.
        Y: float [N, L] 0/1 targets, NaN missing (masked out of that label's loss).
        C: float [L] inverse regularisation strength per label.
        coef0: float64 [L, D + 1] warm start (last column: intercept), or None for zeros.
        max_iter: L-BFGS iterations at most.
        tol: a problem stops when every entry of its gradient is below this.
        ftol: relative objective change that also stops a problem (``batched_lbfgs``); 0: off.
        return_info: also return ``n_iter`` int64 [L] and ``converged`` bool [L].
        precondition: solve in the principal axes of the centred features, each axis scaled by
            the inverse square root of an estimate of that label's curvature along it
            (``pi (1 - pi) * variance + 1 / (C n)``, pi the label's prevalence). The objective
            and optimum are unchanged (an exact change of variables; the stopping test is on
            the gradient of the original weights), but correlated features and weak
            regularisation need far fewer iterations. Costs an eigendecomposition of the
            D x D covariance and a rotated float64 copy of ``X``.

    Returns:
        float64 [L, D + 1]: weights, then the intercept in the last column (with
        ``return_info``: that, ``n_iter`` and ``converged``).
    """
    N, D = X.shape
    L = Y.shape[1]
    M = (~np.isnan(Y)).astype(np.float64)
    T = np.where(M > 0, Y, 0.0).astype(np.float64)
    n_known = M.sum(0)
    inv_n = 1.0 / n_known
    reg = 1.0 / (np.asarray(C, dtype=np.float64) * n_known)

    def fun(W, rows):
        every = rows.size == L
        m, t = (M, T) if every else (M[:, rows], T[:, rows])
        w, b = W[:, :D], W[:, D]
        Z = X @ w.T + b
        loss = (m * (np.logaddexp(0.0, Z) - t * Z)).sum(0) * inv_n[rows]
        R = m * (expit(Z) - t) * inv_n[rows]
        G = np.empty_like(W)
        G[:, :D] = (X.T @ R).T + reg[rows, None] * w
        G[:, D] = R.sum(0)
        return loss + 0.5 * reg[rows] * (w * w).sum(1), G

    x0 = np.zeros((L, D + 1)) if coef0 is None else np.asarray(coef0, dtype=np.float64)
    if not precondition:
        return batched_lbfgs(fun, x0, max_iter, tol, ftol=ftol, return_info=return_info)
    return _ovr_preconditioned(X, M, T, inv_n, reg, x0, max_iter, tol, ftol, return_info)


def _ovr_preconditioned(X, M, T, inv_n, reg, x0, max_iter, tol, ftol, return_info):
    """``fit_ovr_lbfgs`` in scaled principal axes: w = V (p * u), b = b' - mu . w (see there)."""
    N, D = X.shape
    mu = X.mean(0)
    Xc = X - mu
    lam, V = np.linalg.eigh(Xc.T @ Xc / N)
    Xr = Xc @ V
    del Xc
    pi = np.clip((M * T).sum(0) * inv_n, 0.01, 0.99)
    Pk = 1.0 / np.sqrt((pi * (1 - pi))[:, None] * np.maximum(lam, 0.0)[None, :] + reg[:, None])  # [L, D]
    L = Pk.shape[0]

    def fun(theta, rows):
        every = rows.size == L
        m, t = (M, T) if every else (M[:, rows], T[:, rows])
        w = Pk[rows] * theta[:, :D]  # weights in the principal axes
        Z = Xr @ w.T + theta[:, D]
        loss = (m * (np.logaddexp(0.0, Z) - t * Z)).sum(0) * inv_n[rows]
        R = m * (expit(Z) - t) * inv_n[rows]
        G = np.empty_like(theta)
        G[:, :D] = Pk[rows] * ((Xr.T @ R).T + reg[rows, None] * w)
        G[:, D] = R.sum(0)
        return loss + 0.5 * reg[rows] * (w * w).sum(1), G

    def gnorm(G, rows):
        g_w = (G[:, :D] / Pk[rows]) @ V.T + G[:, D:] * mu  # gradient of the original weights
        return np.maximum(np.abs(g_w).max(1), np.abs(G[:, D]))

    w0 = x0[:, :D]
    theta0 = np.concatenate([(w0 @ V) / Pk, (x0[:, D] + w0 @ mu)[:, None]], axis=1)
    out = batched_lbfgs(fun, theta0, max_iter, tol, ftol=ftol, return_info=True, gnorm=gnorm)
    w = (Pk * out[0][:, :D]) @ V.T
    W = np.concatenate([w, (out[0][:, D] - w @ mu)[:, None]], axis=1)
    return (W, out[1], out[2]) if return_info else W


def fit_multinomial_lbfgs(
    X: np.ndarray,
    y: np.ndarray,
    n_classes: int,
    C: float,
    coef0: np.ndarray | None = None,
    max_iter: int = 1000,
    tol: float = 1e-6,
    ftol: float = 64 * np.finfo(np.float64).eps,
    return_info: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Multinomial (softmax) logistic regressions of many independent problems, solved together.

    Problem ``e`` minimises ``mean_i cross_entropy + ||W_e||^2 / (2 C n_e)`` over its rows with a
    class (``y >= 0``), all C weight rows penalised, as scikit-learn's multinomial lbfgs.

    Args:
        X: float64 [E, n, D] features of each problem (E = 1 for a single probe).
        y: int [E, n] class indices, -1 masked out.
        n_classes: C.
        C: inverse regularisation strength (shared by all problems).
        coef0: float64 [E, D + 1, C] warm start (last row: intercepts), or None for zeros.
        max_iter: L-BFGS iterations at most.
        tol: a problem stops when every entry of its gradient is below this.
        ftol: relative objective change that also stops a problem (``batched_lbfgs``); 0: off.
        return_info: also return ``n_iter`` int64 [E] and ``converged`` bool [E].

    Returns:
        float64 [E, D + 1, C]: weights, then the intercepts in the last row (with
        ``return_info``: that, ``n_iter`` and ``converged``).
    """
    E, n, D = X.shape
    known = y >= 0
    M = known.astype(np.float64)[..., None]
    onehot = np.zeros((E, n, n_classes))
    np.put_along_axis(onehot, np.where(known, y, 0)[..., None], 1.0, axis=-1)
    onehot *= M
    inv_n = 1.0 / known.sum(1)

    def fun(theta, rows):
        every = rows.size == E
        x, hot, m, inv = (X, onehot, M, inv_n) if every else (X[rows], onehot[rows], M[rows], inv_n[rows])
        W = theta.reshape(-1, D + 1, n_classes)
        w, b = W[:, :D], W[:, D:]
        logp = log_softmax(x @ w + b, axis=-1)
        R = (m * np.exp(logp) - hot) * inv[:, None, None]
        G = np.empty_like(W)
        G[:, :D] = x.transpose(0, 2, 1) @ R + (inv / C)[:, None, None] * w
        G[:, D] = R.sum(1)
        loss = -(hot * logp).sum((1, 2)) * inv + 0.5 * (inv / C) * (w * w).sum((1, 2))
        return loss, G.reshape(len(rows), -1)

    x0 = np.zeros((E, (D + 1) * n_classes)) if coef0 is None else np.reshape(coef0, (E, -1))
    out = batched_lbfgs(fun, x0, max_iter, tol, ftol=ftol, return_info=True)
    theta = out[0].reshape(E, D + 1, n_classes)
    return (theta, out[1], out[2]) if return_info else theta


def fit_binary_newton_dual(
    K: np.ndarray,
    y: np.ndarray,
    C: float,
    max_iter: int = 100,
    tol: float = 1e-10,
) -> tuple[np.ndarray, np.ndarray]:
    """Many tiny binary logistic regressions by Newton's method in the span of their rows.

    Problem ``e`` has n support rows with Gram matrix ``K_e = X_e X_e^T``. The optimum weight
    vector of ``C * sum log_loss + 0.5 ||w||^2`` (intercept unpenalised) lies in the row span,
    ``w = X_e^T alpha``, and the exact primal Newton step stays there, so each step is one
    (n + 1) x (n + 1) linear solve per problem instead of a D x D one, with a backtracking
    line search for global convergence.

    Args:
        K: float64 [E, n, n] Gram matrices of the support rows.
        y: float [E, n] 0/1 targets.
        C: inverse regularisation strength.
        max_iter: Newton iterations at most.
        tol: stop when every problem's Newton decrement (squared, halved) is below this.

    Returns:
        (alpha float64 [E, n], intercept float64 [E]); weights are ``X_e^T alpha_e``.
    """
    E, n, _ = K.shape
    y = np.asarray(y, dtype=np.float64)
    alpha = np.zeros((E, n))
    b = np.zeros(E)
    eye = np.eye(n)

    def objective(a, bb):
        z = np.einsum("eij,ej->ei", K, a) + bb[:, None]
        return C * (np.logaddexp(0.0, z) - y * z).sum(1) + 0.5 * np.einsum(
            "ei,ei->e", a, np.einsum("eij,ej->ei", K, a)
        )

    f = objective(alpha, b)
    for _ in range(max_iter):
        z = np.einsum("eij,ej->ei", K, alpha) + b[:, None]
        p = expit(z)
        r = p - y
        s = np.maximum(p * (1.0 - p), 1e-12)
        v = alpha + C * r
        A = np.empty((E, n + 1, n + 1))
        A[:, :n, :n] = eye + C * s[:, :, None] * K
        A[:, :n, n] = C * s
        A[:, n, :n] = np.einsum("ei,eij->ej", s, K)
        A[:, n, n] = s.sum(1)
        rhs = np.concatenate([-v, -r.sum(1, keepdims=True)], axis=1)
        step = np.linalg.solve(A, rhs[..., None])[..., 0]
        da, db = step[:, :n], step[:, n]
        # Directional derivative of the primal objective along the step: -(Newton decrement)^2.
        slope = np.einsum("ei,ei->e", v, np.einsum("eij,ej->ei", K, da)) + C * r.sum(1) * db
        if np.all(-slope / 2 < tol):
            break
        t = np.ones(E)
        for _ in range(40):
            f_new = objective(alpha + t[:, None] * da, b + t * db)
            bad = f_new > f + 1e-4 * t * slope
            if not bad.any():
                break
            t = np.where(bad, t / 2, t)
        alpha = alpha + t[:, None] * da
        b = b + t * db
        f = objective(alpha, b)
    return alpha, b
