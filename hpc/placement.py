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
    # every client a group of its own: group k is client k, so the hosted group indices are the client ids
    return place_groups([[i] for i in range(m)], declared_sizes, world_size)


def place_groups(groups: list[list[int]], declared_sizes: list[int], world_size: int) -> list[list[int]] | None:
    """The same greedy placement over whole groups of clients (the blocks an earlier session's ranks hosted): the
    largest group (by declared size) to the least loaded rank, ties by the group's first client id, then rank.
    Returns, per rank, the indices into `groups` it hosts (in increasing order); None when there are fewer groups
    than ranks (a group cannot be split). Deterministic and computed from public sizes only, like place_clients."""
    if world_size < 1 or len(groups) < world_size:
        return None
    weight = [sum(declared_sizes[c] for c in g) for g in groups]
    order = sorted(range(len(groups)), key=lambda k: (-weight[k], min(groups[k])))
    loads = [0] * world_size
    hosted: list[list[int]] = [[] for _ in range(world_size)]
    # first give every rank one group so none is empty, then balance the rest
    for j, k in enumerate(order):
        r = j if j < world_size else min(range(world_size), key=lambda i: (loads[i], i))
        hosted[r].append(k)
        loads[r] += weight[k]
    return [sorted(h) for h in hosted]
