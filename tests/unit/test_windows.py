"""The one pane/window scheme behind metric panes, log statistics windows and trending items."""

from hypothesis import given
from hypothesis import strategies as st

from models import logs, metrics, recommendations, windows

# Event times: negative, fractional and large; steps that are and are not whole seconds.
times = st.one_of(
    st.integers(min_value=-(10**10), max_value=10**10).map(float),
    st.floats(min_value=-1e10, max_value=1e10, allow_nan=False, allow_infinity=False),
)
# Event times as sent: whole milliseconds (a window edge compared at 1e-251 s rounds away).
millisecond_times = st.integers(min_value=-(10**13), max_value=10**13).map(lambda ms: ms / 1000)
steps = st.sampled_from([1.0, 10.0, 60.0, 3600.0, 86400.0, 0.5, 0.25, 7.0])


@given(ts=times, step=steps)
def test_every_time_falls_in_exactly_one_pane(ts, step):
    start = windows.pane_start(ts, step)
    assert start <= ts < start + step
    assert windows.pane_start(start, step) == start  # a pane's start is in that pane, not the one before
    assert windows.pane_start(start + step, step) == start + step  # its end starts the next pane


@given(now=millisecond_times, step=steps, panes=st.integers(min_value=1, max_value=48))
def test_the_panes_of_a_window_cover_it_exactly(now, step, panes):
    window = panes * step
    starts = windows.pane_starts(now, window, step)
    assert len(starts) == panes
    assert starts == sorted(starts, reverse=True)
    assert starts[0] == windows.pane_start(now, step)  # the newest pane holds now
    for newer, older in zip(starts, starts[1:], strict=False):
        assert newer - older == step  # adjacent: no gap, no overlap
    assert all(windows.in_window(start, now, window) for start in starts)
    assert not windows.in_window(starts[-1] - step, now, window)
    assert not windows.in_window(starts[0] + step, now, window)


@given(ts=times, step=steps)
def test_a_pane_key_spells_its_start(ts, step):
    start = windows.pane_start(ts, step)
    assert windows.key_start(windows.pane_key(start)) == round(start, windows.KEY_DECIMALS)


def test_panes_close_after_the_grace_or_when_a_later_pane_has_data():
    starts = [660.0, 600.0, 720.0]
    assert windows.panes_to_close(starts, now=664.0, step=60.0, grace=5.0) == []
    assert windows.panes_to_close(starts, now=665.0, step=60.0, grace=5.0) == [600.0]
    assert windows.panes_to_close(starts, now=0.0, step=60.0, grace=5.0, newest=720.0) == [600.0]
    assert windows.panes_to_close(starts, now=800.0, step=60.0, grace=5.0, closed_through=600.0) == [660.0, 720.0]


def test_panes_are_retained_for_the_kept_span_before_the_newest():
    assert windows.retained(601.0, newest=1200.0, keep=600.0)
    assert not windows.retained(600.0, newest=1200.0, keep=600.0)


@given(ts=st.floats(min_value=946684800.0, max_value=4e9, allow_nan=False), step=st.sampled_from([10.0, 60.0, 3600.0]))
def test_the_three_jobs_put_a_time_in_the_same_pane(ts, step):
    start = windows.pane_start(ts, step)
    assert metrics.pane_start(ts, step) == start
    iso = logs.iso_timestamp(logs.to_timestamp(ts))  # milliseconds: the pane of the logged time
    assert logs.window_start(iso, step) == windows.pane_start(logs.to_timestamp(iso).timestamp(), step)
    assert recommendations.trend_pane_key(start) == str(int(start))
    assert metrics.pane_key("s", start).endswith(logs.window_key(start))
