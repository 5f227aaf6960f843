"""Split a data set across simulated clients, then each client into train/test.

Everything is deterministic given the public seed, so a partition can be rebuilt exactly
(the partition is public; the records inside it are not).
"""

from __future__ import annotations

import warnings

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
    """Take one fold of StratifiedGroupKFold with about 1/test_fraction folds as the test side."""
    from sklearn.model_selection import StratifiedGroupKFold

    n_groups = len(np.unique(g_loc))
    if n_groups < 2:
        raise DataError(
            f"{who} ({n} records) holds a single group, so it cannot be split by group into train and "
            "test; use fewer clients or a larger partition.min_client_size"
        )
    k = int(min(max(2, round(1.0 / test_fraction)), n_groups))
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=int(seed) % (2**32))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "least populated class has fewer members than n_splits" is expected
        for _, test_idx in splitter.split(np.zeros(n), y_loc, g_loc):
            if 0 < len(test_idx) < n:
                mask = np.zeros(n, dtype=bool)
                mask[test_idx] = True
                return mask
    raise DataError(
        f"{who} ({n} records, {n_groups} groups) could not be split by group into non-empty train "
        "and test sides; use fewer clients or a larger partition.min_client_size"
    )
