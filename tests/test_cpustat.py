"""CPU steal accounting (mabl.cpustat) against hand-written /proc/stat contents."""
from __future__ import annotations

from mabl.cpustat import StealMeter, read_cpu_times, steal_fraction

HEADER = "cpu  {u} 0 {s} {i} 0 0 0 {st} 0 0\ncpu0 1 2 3 4 5 6 7 8 9 10\nintr 123\n"


def write(path, u, s, i, st):
    path.write_text(HEADER.format(u=u, s=s, i=i, st=st))


def test_read_cpu_times_uses_the_aggregate_line(tmp_path):
    p = tmp_path / "stat"
    write(p, 100, 50, 800, 50)
    assert read_cpu_times(p) == (50, 1000)  # guest columns are not added to the total


def test_read_cpu_times_is_none_without_a_usable_file(tmp_path):
    assert read_cpu_times(tmp_path / "missing") is None
    p = tmp_path / "stat"
    p.write_text("cpu  1 2 3 4\n")  # no steal column
    assert read_cpu_times(p) is None
    p.write_text("intr 1\n")
    assert read_cpu_times(p) is None
    p.write_text("cpu  a b c d e f g h\n")
    assert read_cpu_times(p) is None


def test_steal_fraction_between_two_readings():
    assert steal_fraction((50, 1000), (350, 2000)) == 0.3
    assert steal_fraction((50, 1000), (50, 1000)) is None  # no time passed
    assert steal_fraction(None, (50, 1000)) is None
    assert steal_fraction((50, 1000), (40, 2000)) == 0.0  # clamped (counters never run backwards in practice)


def test_steal_meter_laps_and_total(tmp_path):
    p = tmp_path / "stat"
    write(p, 100, 0, 900, 0)  # total 1000, steal 0
    m = StealMeter(p)
    write(p, 300, 0, 1100, 600)  # total 2000: +1000, of it +600 steal
    assert m.lap() == 0.6
    write(p, 400, 0, 1200, 600)  # +200 total, no steal since the last lap
    assert m.lap() == 0.0
    assert m.total() == 600 / 1200
    (p).unlink()
    assert m.lap() is None and m.total() is None


def test_the_real_proc_stat_when_there_is_one():
    now = read_cpu_times()
    if now is None:  # not Linux: nothing to read, and the meter says so instead of guessing
        assert StealMeter().total() is None
    else:
        steal, total = now
        assert 0 <= steal <= total and total > 0
