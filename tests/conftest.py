import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# keep test processes from oversubscribing the 2-core CI machine
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is not present")
    return SHARED_DATA


# One policy for the tests that change the machine (install slurm-wlm and munge with apt-get and start
# slurmctld/slurmd as root): `make test` runs them, as CI does; FHV_SLURM=0 skips them, saying why.
SLURM_OFF = os.environ.get("FHV_SLURM", "1").strip() == "0"
SLURM_SKIP_REASON = (
    "FHV_SLURM=0: skipped a test that installs SLURM (apt-get slurm-wlm, munge) and starts its daemons as root"
)


def pytest_report_header(config):
    if SLURM_OFF:
        return SLURM_SKIP_REASON.replace("skipped a test", "skipping every test")
    if os.geteuid() == 0:
        return (
            "running as root: tests marked `slurm` install slurm-wlm and munge and start slurmctld/slurmd on this "
            "machine (FHV_SLURM=0 skips them)"
        )
    return None


def pytest_collection_modifyitems(config, items):
    if not SLURM_OFF:
        return
    skip = pytest.mark.skip(reason=SLURM_SKIP_REASON)
    for item in items:
        if "slurm" in item.keywords:
            item.add_marker(skip)
