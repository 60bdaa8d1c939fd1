"""The training tests run tiny models: one intra-op thread (a thread pool costs more than these
steps on a busy 2-core machine, 0.5 s instead of 8 s for a 4-step toy run), the same in the
subprocesses they start (OMP_NUM_THREADS=1), so in- and out-of-process runs agree bitwise."""

import pytest
from train_testing import write_volumes


@pytest.fixture(autouse=True, scope="module")
def _train_one_thread(one_thread):
    yield


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Two small NIfTI volumes in a folder, shared by a module's tests."""
    return write_volumes(str(tmp_path_factory.mktemp("vols")))


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    """A preprocessing cache of the test's own (``pytestmark = usefixtures("fresh_cache")``)."""
    monkeypatch.setenv("MAE3D_CACHE", str(tmp_path / "cache"))
