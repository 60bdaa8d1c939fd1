"""The training tests run tiny models: one intra-op thread (a thread pool costs more than these
steps on a busy 2-core machine, 0.5 s instead of 8 s for a 4-step toy run), the same in the
subprocesses they start (OMP_NUM_THREADS=1), so in- and out-of-process runs agree bitwise."""

import pytest


@pytest.fixture(autouse=True, scope="module")
def _train_one_thread(one_thread):
    yield
