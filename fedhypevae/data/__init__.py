"""Data loading, per-record transforms, federated partitioning and client shards."""

from .federation import (
    ClientData,
    Federation,
    build_federation,
    describe_dataset,
    describe_shards,
    federation_from_dataset,
    is_shard_dir,
    load_shards,
    read_manifest,
    shard_file,
    write_shards,
)
from .loaders import BUILTINS, EXTENSIONS, Dataset, load_dataset
from .partition import partition_indices, split_client
from .transforms import apply_transform, invert_transform, is_invertible, output_units, resolve_transform

__all__ = [
    "BUILTINS",
    "EXTENSIONS",
    "ClientData",
    "Dataset",
    "Federation",
    "apply_transform",
    "build_federation",
    "describe_dataset",
    "describe_shards",
    "federation_from_dataset",
    "invert_transform",
    "is_invertible",
    "is_shard_dir",
    "load_dataset",
    "load_shards",
    "shard_file",
    "output_units",
    "partition_indices",
    "read_manifest",
    "resolve_transform",
    "split_client",
    "write_shards",
]
