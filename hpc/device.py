"""Device per local rank: cuda:LOCAL_RANK when CUDA is present, else the CPU.

Untested on GPUs on the development machine (it has none): the code path is kept deliberately small.
"""

from __future__ import annotations

DEVICES = ("auto", "cpu", "cuda")  # the --device choices of `fedhypevae train` and the sweep


def choose_device(local_rank: int, requested: str = "auto"):
    """The torch.device of this rank (torch is imported here: the command lines read DEVICES without it)."""
    import torch

    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("--device cuda was requested but torch.cuda.is_available() is false on this node")
    n = torch.cuda.device_count()
    dev = torch.device("cuda", local_rank % n)
    torch.cuda.set_device(dev)
    return dev
