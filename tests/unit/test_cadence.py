"""The trainers' shared rule for logging, saving and stopping early (training/cadence.py)."""

from megatron_moca.training.cadence import Cadence


def test_logs_saves_and_exits_on_their_intervals_and_at_the_end():
    c = Cadence(train_iters=10, log_interval=4, save_interval=6, exit_interval=3)
    assert [i for i in range(1, 11) if c.logs(i)] == [4, 8, 10]
    assert [i for i in range(1, 11) if c.exits(i)] == [3, 6, 9]  # never at the end: the run is done
    assert [i for i in range(1, 11) if c.saves(i)] == [3, 6, 9, 10]  # every stop is resumable


def test_no_exit_interval_never_stops_early():
    for none in (None, 0):
        c = Cadence(train_iters=5, log_interval=1, save_interval=100, exit_interval=none)
        assert not any(c.exits(i) for i in range(1, 6))
        assert [i for i in range(1, 6) if c.saves(i)] == [5]
