"""When a canary may move: the route's schedule windows. Pure.

A window is a set of days and a span of the day in the schedule's time zone; a span
whose end is at or before its start runs past midnight into the next day (and
belongs to the day it starts on).

Rules:
1. No schedule: always inside.
2. `advance`: outside the windows, steps do not go up (a rollback still happens).
3. `serve`: outside the windows, the canary gets no traffic at all.
"""

from __future__ import annotations

import datetime
from zoneinfo import ZoneInfo

from proxy.config.model import Schedule, ScheduleMode, TimeWindow

__all__ = ["inside", "may_advance", "may_serve"]


def inside(schedule: Schedule | None, epoch_s: float) -> bool:
    """Is this instant inside one of the schedule's windows?"""
    if schedule is None:
        return True
    local = datetime.datetime.fromtimestamp(epoch_s, ZoneInfo(schedule.timezone))
    minute = local.hour * 60 + local.minute
    weekday = local.weekday()
    return any(_in_window(window, weekday, minute) for window in schedule.windows)


def may_advance(schedule: Schedule | None, epoch_s: float) -> bool:
    return inside(schedule, epoch_s)


def may_serve(schedule: Schedule | None, epoch_s: float) -> bool:
    if schedule is None or schedule.mode is ScheduleMode.ADVANCE:
        return True
    return inside(schedule, epoch_s)


def _in_window(window: TimeWindow, weekday: int, minute: int) -> bool:
    start, end = window.start_minute, window.end_minute
    if start < end:
        return weekday in window.days and start <= minute < end
    # Past midnight: the evening of a listed day, or the early hours after one.
    if weekday in window.days and minute >= start:
        return True
    return (weekday - 1) % 7 in window.days and minute < end
