"""A child of `tally up` that keeps dying soon after it was ready is restarted later
each time, up to a cap: no spinning on a crash loop, and a one-off crash is restarted
at once."""

from __future__ import annotations

from services.up.supervisor import RESTART_DELAYS, restart_delay


def test_the_delay_grows_to_a_cap() -> None:
    delays = [restart_delay(n) for n in range(1, 10)]
    assert delays[0] == 0.0  # the first restart: at once
    assert delays == sorted(delays) and delays[1] > 0
    assert max(delays) == RESTART_DELAYS[-1] <= 5.0
    assert delays[-1] == delays[-2] == RESTART_DELAYS[-1]
