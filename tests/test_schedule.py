"""proxy.routing.schedule: when a canary may move (advance) and when it may be served (serve)."""

from __future__ import annotations

import datetime
from zoneinfo import ZoneInfo

import pytest

from proxy.config import parse_config
from proxy.config.grammar import parse_window
from proxy.config.model import Schedule, ScheduleMode, TimeWindow
from proxy.routing.schedule import inside, may_advance, may_serve

UTC = ZoneInfo("UTC")
BERLIN = ZoneInfo("Europe/Berlin")


def at(zone: ZoneInfo, year: int, month: int, day: int, hour: int, minute: int = 0) -> float:
    """Epoch seconds of a wall-clock time in `zone`."""
    return datetime.datetime(year, month, day, hour, minute, tzinfo=zone).timestamp()


def schedule(
    *windows: str, timezone: str = "UTC", mode: ScheduleMode = ScheduleMode.ADVANCE
) -> Schedule:
    return Schedule(timezone, tuple(parse_window(w) for w in windows), mode)


# 2026-03-02 is a Monday; 2026-03-06 a Friday; 2026-03-07 a Saturday.
OFFICE_HOURS_UTC = [
    (at(UTC, 2026, 3, 2, 9, 0), True),  # Monday, the window opens
    (at(UTC, 2026, 3, 2, 8, 59), False),
    (at(UTC, 2026, 3, 4, 12, 30), True),  # Wednesday noon
    (at(UTC, 2026, 3, 6, 17, 59), True),  # Friday, the last minute
    (at(UTC, 2026, 3, 6, 18, 0), False),  # the end is exclusive
    (at(UTC, 2026, 3, 7, 12, 0), False),  # Saturday
    (at(UTC, 2026, 3, 8, 12, 0), False),  # Sunday
]


@pytest.mark.parametrize(("epoch_s", "expected"), OFFICE_HOURS_UTC)
def test_weekday_office_hours_in_utc(epoch_s: float, expected: bool) -> None:
    assert inside(schedule("Mon-Fri 09:00-18:00"), epoch_s) is expected


# Berlin is UTC+1 until 2026-03-29 02:00, then UTC+2 (CEST).
@pytest.mark.parametrize(
    ("epoch_s", "expected"),
    [
        (at(UTC, 2026, 3, 23, 8, 30), True),  # Monday 09:30 CET
        (at(UTC, 2026, 3, 23, 7, 30), False),  # Monday 08:30 CET
        (at(UTC, 2026, 3, 23, 16, 59), True),  # Monday 17:59 CET
        (at(UTC, 2026, 3, 23, 17, 0), False),  # Monday 18:00 CET
        (at(UTC, 2026, 3, 30, 7, 30), True),  # Monday 09:30 CEST, after the change
        (at(UTC, 2026, 3, 30, 6, 30), False),  # Monday 08:30 CEST
        (at(UTC, 2026, 3, 30, 16, 30), False),  # Monday 18:30 CEST
        (at(BERLIN, 2026, 3, 30, 9, 0), True),
        (at(UTC, 2026, 3, 27, 23, 30), False),  # Friday in UTC, Saturday 00:30 in Berlin
    ],
)
def test_weekday_office_hours_follow_the_zone_across_dst(epoch_s: float, expected: bool) -> None:
    office = schedule("Mon-Fri 09:00-18:00", timezone="Europe/Berlin")
    assert inside(office, epoch_s) is expected


@pytest.mark.parametrize(
    ("epoch_s", "expected"),
    [
        (at(UTC, 2026, 3, 6, 21, 59), False),  # Friday before the start
        (at(UTC, 2026, 3, 6, 22, 0), True),  # Friday 22:00
        (at(UTC, 2026, 3, 6, 23, 0), True),  # Friday 23:00
        (at(UTC, 2026, 3, 7, 0, 0), True),  # Saturday midnight
        (at(UTC, 2026, 3, 7, 1, 0), True),  # Saturday 01:00: still Friday's window
        (at(UTC, 2026, 3, 7, 2, 0), False),  # the end is exclusive
        (at(UTC, 2026, 3, 7, 3, 0), False),  # Saturday 03:00
        (at(UTC, 2026, 3, 7, 23, 0), False),  # Saturday evening is not a window
        (at(UTC, 2026, 3, 6, 1, 0), False),  # Friday early hours belong to Thursday
    ],
)
def test_a_window_past_midnight_belongs_to_the_day_it_starts(
    epoch_s: float, expected: bool
) -> None:
    assert inside(schedule("Fri 22:00-02:00"), epoch_s) is expected


def test_a_window_past_midnight_wraps_the_week() -> None:
    sunday_night = schedule("Sun 23:00-01:00")
    assert inside(sunday_night, at(UTC, 2026, 3, 8, 23, 30))  # Sunday
    assert inside(sunday_night, at(UTC, 2026, 3, 9, 0, 30))  # Monday early hours
    assert not inside(sunday_night, at(UTC, 2026, 3, 9, 23, 30))  # Monday evening


@pytest.mark.parametrize(
    "epoch_s",
    [
        at(UTC, 2026, 3, 2, 0, 0),
        at(UTC, 2026, 3, 4, 12, 0),
        at(UTC, 2026, 3, 8, 23, 59),
        at(UTC, 2026, 3, 7, 6, 15),
    ],
)
def test_daily_whole_day_is_always_inside(epoch_s: float) -> None:
    assert inside(schedule("daily 00:00-24:00"), epoch_s)


def test_any_of_several_windows_is_enough() -> None:
    split = schedule("Mon 09:00-12:00", "Mon 14:00-17:00")
    assert inside(split, at(UTC, 2026, 3, 2, 10, 0))
    assert not inside(split, at(UTC, 2026, 3, 2, 13, 0))
    assert inside(split, at(UTC, 2026, 3, 2, 15, 0))


def test_time_windows_built_directly_use_monday_as_day_zero() -> None:
    weekend = Schedule("UTC", (TimeWindow(frozenset({5, 6}), 0, 24 * 60, "Sat-Sun"),))
    assert inside(weekend, at(UTC, 2026, 3, 7, 12, 0))  # Saturday
    assert inside(weekend, at(UTC, 2026, 3, 8, 12, 0))  # Sunday
    assert not inside(weekend, at(UTC, 2026, 3, 2, 12, 0))  # Monday


INSIDE = at(UTC, 2026, 3, 2, 10, 0)  # Monday 10:00
OUTSIDE = at(UTC, 2026, 3, 2, 20, 0)  # Monday 20:00


@pytest.mark.parametrize(
    ("mode", "epoch_s", "advance", "serve"),
    [
        (ScheduleMode.ADVANCE, INSIDE, True, True),
        (ScheduleMode.ADVANCE, OUTSIDE, False, True),  # served, but no steps up
        (ScheduleMode.SERVE, INSIDE, True, True),
        (ScheduleMode.SERVE, OUTSIDE, False, False),  # no canary traffic at all
    ],
)
def test_mode_decides_what_stops_outside_the_windows(
    mode: ScheduleMode, epoch_s: float, advance: bool, serve: bool
) -> None:
    office = schedule("Mon-Fri 09:00-18:00", mode=mode)
    assert may_advance(office, epoch_s) is advance
    assert may_serve(office, epoch_s) is serve


@pytest.mark.parametrize("epoch_s", [INSIDE, OUTSIDE, 0.0, at(UTC, 2026, 3, 8, 3, 0)])
def test_no_schedule_is_always_inside(epoch_s: float) -> None:
    assert inside(None, epoch_s)
    assert may_advance(None, epoch_s)
    assert may_serve(None, epoch_s)


CONFIG = """
backends:
  v1: {url: "http://127.0.0.1:8001"}
  v2: {url: "http://127.0.0.1:8002"}
routes:
  - name: chat
    match: {path_prefix: /v1/}
    stable: v1
    canary: v2
    sticky: {keys: [header:x-user-id], salt: s}
    schedule:
      timezone: Europe/Berlin
      windows: ["Mon-Fri 09:00-18:00", "Sat 22:00-02:00"]
      mode: serve
"""


def test_a_parsed_schedule_is_judged_in_its_zone() -> None:
    route = parse_config(CONFIG).routes[0]
    assert route.schedule is not None
    assert route.schedule.mode is ScheduleMode.SERVE
    # Monday 09:30 in Berlin (08:30 UTC), and Sunday 01:00 in Berlin after Saturday's window.
    assert may_serve(route.schedule, at(BERLIN, 2026, 3, 2, 9, 30))
    assert not may_serve(route.schedule, at(UTC, 2026, 3, 2, 17, 30))  # 18:30 in Berlin
    assert may_serve(route.schedule, at(BERLIN, 2026, 3, 8, 1, 0))
    assert not may_serve(route.schedule, at(BERLIN, 2026, 3, 8, 2, 30))
