import os
import sys
from pathlib import Path

# The tests run in one pytest-xdist worker per core (pytest.ini), and most start the script in a
# subprocess: one thread each, so that two workers' OpenMP pools never wait on one another's cores.
os.environ["OMP_NUM_THREADS"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    # The in-process tests use tiny tensors; intra-op threads only add synchronisation, and on a busy
    # 2-core machine OpenMP's waiting made a 1000-step sampling loop 50x slower. The CLI tests run
    # the script in subprocesses, which this does not touch.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
