"""The model buffer's sequence sampling: uniform, and the uniform + recency mixture."""
import numpy as np
import pytest

from mabl.buffer import ReplayBuffer
from mabl.config import make_config, parse_set
from mabl.errors import ConfigError
from mabl.envs.base import EnvSpec

SPEC = EnvSpec("toy:x", 2, 3, 4, 5, True, True, 30, True)


def _filled(capacity: int, steps: int, episode: int = 7) -> ReplayBuffer:
    """A buffer whose step k (k-th step ever added) carries k in ``state[:, 0]``."""
    buf, k = ReplayBuffer(SPEC, capacity), 0
    while k < steps:
        T = min(episode, steps - k)
        idx = np.arange(k, k + T, dtype=np.float32)
        buf.add_episode({"obs": np.zeros((T, 2, 3), np.float32), "state": np.repeat(idx[:, None], 4, 1),
                         "prev_action": np.zeros((T, 2, 5), np.float32), "reward": np.zeros((T, 2), np.float32),
                         "cont": np.ones(T, np.float32), "avail": np.ones((T, 2, 5), bool), "is_first": np.arange(T) == 0})
        k += T
    return buf


@pytest.mark.parametrize("capacity,steps", [(1000, 600), (300, 1000)])  # partly filled; wrapped ring
def test_sequences_are_consecutive_and_never_straddle_the_write_pointer(capacity, steps):
    buf = _filled(capacity, steps)
    oldest = steps - len(buf)
    for recent in (0.0, 0.5, 1.0):
        b = buf.sample(64, 20, np.random.default_rng(1), recent=recent, window=50)
        ids = b["state"][..., 0].numpy()  # [T, B] global step ids
        assert (np.diff(ids, axis=0) == 1).all()  # consecutive, oldest -> newest, no jump at the pointer
        assert ids.min() >= oldest and ids.max() <= steps - 1


def test_recent_fraction_draws_that_share_from_the_newest_window():
    steps, window, batch = 5000, 200, 400
    buf = _filled(10_000, steps)
    b = buf.sample(batch, 20, np.random.default_rng(0), recent=0.25, window=window)
    start = b["state"][0, :, 0].numpy()
    uniform, recent = start[: batch - 100], start[batch - 100:]
    assert (recent >= steps - window).all() and (recent <= steps - 20).all()
    # the uniform part still covers the whole buffer: most of it lies outside the window
    assert (uniform < steps - window).mean() > 0.9 and uniform.min() < 1000
    # recent=0 is the plain uniform draw (same random stream as before the option existed)
    a = buf.sample(batch, 20, np.random.default_rng(3))
    c = buf.sample(batch, 20, np.random.default_rng(3), recent=0.0, window=window)
    assert np.array_equal(a["state"].numpy(), c["state"].numpy())
    expect = np.random.default_rng(3).integers(0, steps - 20 + 1, size=batch)
    assert np.array_equal(a["state"][0, :, 0].numpy(), expect)


def test_window_shorter_than_the_sequence_still_gives_full_sequences():
    buf = _filled(1000, 300)
    b = buf.sample(16, 20, np.random.default_rng(0), recent=1.0, window=5)
    assert (b["state"][0, :, 0].numpy() == 300 - 20).all()


def test_recent_fraction_is_validated():
    with pytest.raises(ConfigError, match="model.recent_fraction must be in"):
        make_config("tiny", "smax:3m", parse_set(["model.recent_fraction=1.5"]))
    with pytest.raises(ConfigError, match="model.recent_window must be > 0"):
        make_config("tiny", "smax:3m", parse_set(["model.recent_window=0"]))
