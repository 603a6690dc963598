import time
from pathlib import Path

import pytest

from trainer.data.prepare import worker_pool


def _write_later(path: str) -> None:
    time.sleep(0.5)
    Path(path).write_text("done")


def test_a_worker_pool_lets_its_workers_finish_when_the_caller_raises(tmp_path):
    """Terminating workers can kill one holding the result queue's lock and hang the teardown (`with Pool()`
    does): the pool is closed and joined instead, so a task already given to a worker completes."""
    marker = tmp_path / "marker"
    with pytest.raises(RuntimeError, match="a bad line"), worker_pool("fork", 2) as pool:
        pool.apply_async(_write_later, (str(marker),))
        raise RuntimeError("a bad line")
    assert marker.read_text() == "done"
