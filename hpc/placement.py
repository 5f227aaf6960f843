"""Client -> rank placement: balance declared (public) sizes across ranks."""

from __future__ import annotations


class PlacementError(ValueError):
    """Raised when clients cannot be placed (e.g. fewer clients than ranks)."""


def place_clients(declared_sizes: list[int], world_size: int) -> list[list[int]]:
    """Greedy longest-processing-time placement: the largest client goes to the least loaded rank.

    Deterministic (ties broken by client id, then rank) so every rank computes the same map
    without communicating. Uses declared sizes only: true sizes are private.
    """
    m = len(declared_sizes)
    if world_size < 1:
        raise PlacementError(f"world size must be >= 1; got {world_size}")
    if m < world_size:
        raise PlacementError(
            f"{m} clients cannot fill {world_size} ranks: every rank must host at least one client. "
            f"Launch at most {m} ranks or raise partition.clients to at least {world_size}."
        )
    loads = [0] * world_size
    placement: list[list[int]] = [[] for _ in range(world_size)]
    order = sorted(range(m), key=lambda i: (-declared_sizes[i], i))
    # first give every rank one client so none is empty, then balance the rest
    for r, cid in enumerate(order[:world_size]):
        placement[r].append(cid)
        loads[r] += declared_sizes[cid]
    for cid in order[world_size:]:
        r = min(range(world_size), key=lambda k: (loads[k], k))
        placement[r].append(cid)
        loads[r] += declared_sizes[cid]
    return [sorted(p) for p in placement]
