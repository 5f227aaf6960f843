"""Split a data set across simulated clients, then each client into train/test.

Everything is deterministic given the public seed, so a partition can be rebuilt exactly
(the partition is public; the records inside it are not).
"""

from __future__ import annotations

import numpy as np

from ..errors import DataError

MAX_DIRICHLET_TRIES = 1000


def partition_indices(
    y, *, kind: str, clients: int, alpha: float, seed: int, min_client_size: int, sites: np.ndarray | None = None
) -> list[np.ndarray]:
    """Return one sorted int64 index array per client (disjoint, covering every record)."""
    y = np.asarray(y)
    n = len(y)
    if clients < 1:
        raise DataError(f"partition.clients must be >= 1; got {clients}")
    if n < clients * min_client_size:
        raise DataError(
            f"{n} records are fewer than partition.clients ({clients}) x partition.min_client_size "
            f"({min_client_size}) = {clients * min_client_size}; use fewer clients or a smaller "
            "min_client_size"
        )
    rng = np.random.default_rng(seed)
    if kind == "iid":
        parts = np.array_split(rng.permutation(n), clients)
    elif kind == "dirichlet":
        parts = _dirichlet(y, clients, alpha, min_client_size, rng)
    elif kind == "site":
        parts = _by_site(sites, clients, min_client_size)
    else:
        raise DataError(f"partition.kind must be iid, dirichlet or site; got {kind!r}")
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def _dirichlet(y, clients, alpha, min_client_size, rng) -> list[np.ndarray]:
    """Label skew: each class is spread over clients with proportions ~ Dir(alpha); resampled until all are big
    enough."""
    classes = np.unique(y)
    by_class = [np.flatnonzero(y == c) for c in classes]
    smallest = 0
    for _ in range(MAX_DIRICHLET_TRIES):
        parts: list[list[np.ndarray]] = [[] for _ in range(clients)]
        for idx in by_class:
            idx = rng.permutation(idx)
            props = rng.dirichlet(np.full(clients, alpha))
            cuts = (np.cumsum(props)[:-1] * len(idx)).astype(int)
            for k, chunk in enumerate(np.split(idx, cuts)):
                parts[k].append(chunk)
        sizes = [sum(len(c) for c in p) for p in parts]
        smallest = min(sizes)
        if smallest >= min_client_size:
            return [np.concatenate(p) for p in parts]
    raise DataError(
        f"dirichlet partition: after {MAX_DIRICHLET_TRIES} draws some client still had fewer than "
        f"partition.min_client_size={min_client_size} records (last smallest: {smallest}); use a larger "
        "partition.alpha, fewer partition.clients or a smaller partition.min_client_size"
    )


def _by_site(sites, clients, min_client_size) -> list[np.ndarray]:
    """One client per distinct site value, in sorted site order."""
    if sites is None:
        raise DataError(
            "partition.kind=site needs a site for every record; set data.site_column "
            "(and data.metadata_path if the column lives in a separate table)"
        )
    sites = np.asarray(sites)
    names = np.unique(sites)
    if len(names) != clients:
        raise DataError(
            f"partition.kind=site makes one client per site, and the data has {len(names)} sites "
            f"({', '.join(map(str, names[:20]))}); set partition.clients={len(names)}"
        )
    parts = [np.flatnonzero(sites == s) for s in names]
    small = [(str(s), len(p)) for s, p in zip(names, parts) if len(p) < min_client_size]
    if small:
        raise DataError(
            f"sites with fewer than partition.min_client_size={min_client_size} records: "
            f"{', '.join(f'{s} ({k})' for s, k in small)}; merge them or lower min_client_size"
        )
    return parts


def split_client(
    indices, y, groups, *, test_fraction: float, seed: int, client_id: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Stratified train/test split of one client's records (global indices in, global indices out).

    With ``groups`` no group lands on both sides (images of one lesion must not leak across the
    split); stratification is then best effort (StratifiedGroupKFold). ``client_id`` only names
    the client in error messages.
    """
    indices = np.asarray(indices, dtype=np.int64)
    who = f"client {client_id}" if client_id is not None else "client"
    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"data.test_fraction must be in (0, 1); got {test_fraction}")
    if len(indices) < 2:
        raise DataError(
            f"{who} has {len(indices)} record(s); it needs at least 2 (one train, one test). "
            "Raise partition.min_client_size or use fewer clients"
        )
    y_loc = np.asarray(y)[indices]
    rng = np.random.default_rng(seed)
    if groups is None:
        test_mask = stratified_mask(y_loc, test_fraction, rng)
    else:
        test_mask = _grouped_mask(y_loc, np.asarray(groups)[indices], test_fraction, seed, who, len(indices))
    train, test = np.sort(indices[~test_mask]), np.sort(indices[test_mask])
    if len(train) == 0 or len(test) == 0:
        raise DataError(
            f"{who} ({len(indices)} records) ended with {len(train)} train and {len(test)} test records; "
            "both need >= 1. Raise partition.min_client_size, use fewer clients or change data.test_fraction"
        )
    return train, test


def stratified_mask(y, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Boolean mask of a stratified split of the labels ``y``: per class round(fraction * n_c) records, keeping
    >= 1 record per class on the other side; when that selects nothing and there are >= 2 records, one record of
    the largest class. The one stratified split of the package: a client's train/test split (``split_client``)
    and the validation split the evaluation carves from a train split (``evaluation.validation_split``)."""
    y = np.asarray(y).reshape(-1)
    mask = np.zeros(len(y), dtype=bool)
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        k = min(int(round(fraction * len(idx))), len(idx) - 1)
        mask[idx[:k]] = True
    if not mask.any() and len(y) >= 2:
        counts = np.bincount(y)
        mask[rng.choice(np.flatnonzero(y == counts.argmax()))] = True
    return mask


def _grouped_mask(y_loc, g_loc, test_fraction, seed, who, n) -> np.ndarray:
    """Take one fold of a stratified group k-fold with about 1/test_fraction folds as the test side: the first
    fold (in fold order) that is neither empty nor everything (`stratified_group_folds`)."""
    n_groups = len(np.unique(g_loc))
    if n_groups < 2:
        raise DataError(
            f"{who} ({n} records) holds a single group, so it cannot be split by group into train and "
            "test; use fewer clients or a larger partition.min_client_size"
        )
    k = int(min(max(2, round(1.0 / test_fraction)), n_groups))
    fold = stratified_group_folds(y_loc, g_loc, k, int(seed) % (2**32))
    if fold is None:
        raise DataError(
            f"{who} ({n} records) has fewer records than the {k} folds of its train/test split in every class; "
            "use fewer clients or a larger partition.min_client_size"
        )
    for i in range(k):
        mask = fold == i
        if 0 < int(mask.sum()) < n:
            return mask
    raise DataError(
        f"{who} ({n} records, {n_groups} groups) could not be split by group into non-empty train "
        "and test sides; use fewer clients or a larger partition.min_client_size"
    )


def stratified_group_folds(y, groups, k: int, seed: int) -> np.ndarray | None:
    """The test fold (0..k-1) of every record under scikit-learn's StratifiedGroupKFold(n_splits=k, shuffle=True,
    random_state=seed) (the algorithm of scikit-learn 1.9, which the shipped results were drawn with), or None
    where it refuses (every class has fewer than k records). The same greedy assignment, vectorized over the folds:
    groups in shuffled order, stably sorted by the spread of their class counts, each to the fold whose class
    proportions it spreads least (ties within np.isclose: the fold with fewer records). scikit-learn's loop over
    folds costs ~0.5 s a client at ~1,000 groups (5 s of every HAM10000 run's start); this is ~100x faster.
    `tests/test_data.py` checks the folds equal scikit-learn's."""
    y = np.asarray(y).reshape(-1)
    _, y_inv, y_cnt = np.unique(y, return_inverse=True, return_counts=True)
    if np.all(k > y_cnt):
        return None
    _, g_inv, g_cnt = np.unique(np.asarray(groups).reshape(-1), return_inverse=True, return_counts=True)
    G, C = len(g_cnt), len(y_cnt)
    counts = np.zeros((G, C))
    np.add.at(counts, (g_inv, y_inv), 1)
    perm = np.arange(G)
    np.random.RandomState(seed).shuffle(perm)
    counts = counts[perm]
    inv_perm = np.empty_like(perm)
    inv_perm[perm] = np.arange(G)
    g_inv = inv_perm[g_inv]
    order = np.argsort(-np.std(counts, axis=1), kind="stable")
    per_fold = np.zeros((k, C))
    fold_of = np.empty(G, dtype=np.int64)
    diag = np.arange(k)
    scale = y_cnt.reshape(1, 1, -1)
    for gi in order:
        g = counts[gi]
        cand = np.broadcast_to(per_fold, (k, k, C)).copy()
        cand[diag, diag] += g  # candidate i: fold i with this group added
        evals = np.mean(np.std(cand / scale, axis=1), axis=-1)
        sizes = per_fold.sum(axis=1)
        best, min_eval, min_size = 0, np.inf, np.inf
        for i in range(k):
            e = float(evals[i])
            if e < min_eval or (abs(e - min_eval) <= 1e-8 + 1e-5 * abs(min_eval) and sizes[i] < min_size):
                best, min_eval, min_size = i, e, float(sizes[i])
        per_fold[best] += g
        fold_of[gi] = best
    return fold_of[g_inv]
