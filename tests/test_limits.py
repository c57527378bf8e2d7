"""Usage-limit vs rate-limit detection against the real Claude Code wordings.

Every message below is quoted from a public report (sources in supervisor/limits.py).  ``NOW`` and
``TZ`` are fixed, so every expected reset time is exact.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest

from supervisor.limits import (
    DEFAULT_KEYWORDS,
    DEFAULT_RATE_PATTERNS,
    DEFAULT_USAGE_PATTERNS,
    PAST_GRACE_SECONDS,
    LimitDetector,
    LimitHit,
    LimitPatterns,
    parse_reset_time,
)

TZ = ZoneInfo("Europe/Berlin")
# Wednesday 15 July 2026, 14:00 in Berlin (12:00 UTC).
NOW = datetime(2026, 7, 15, 14, 0, tzinfo=TZ).timestamp()


def at(zone: str, year: int, month: int, day: int, hour: int, minute: int) -> float:
    return datetime(year, month, day, hour, minute, tzinfo=ZoneInfo(zone)).timestamp()


@pytest.fixture
def detector() -> LimitDetector:
    return LimitDetector(tz=TZ)


USAGE_CASES: list[tuple[str, float | None]] = [
    # the epoch form
    ("Claude AI usage limit reached|1762952400", 1762952400.0),
    ("Claude AI usage limit reached|1760004000", 1760004000.0),
    # "Claude usage limit reached. Your limit will reset at ..."
    (
        "Claude usage limit reached. Your limit will reset at 5pm (Europe/Warsaw).",
        at("Europe/Warsaw", 2026, 7, 15, 17, 0),
    ),
    (
        "Claude usage limit reached. Your limit will reset at 1pm (Etc/GMT+5).",
        at("Etc/GMT+5", 2026, 7, 15, 13, 0),
    ),
    (
        " ⎿  Claude usage limit reached. Your limit will reset at 9am (America/Chicago).",
        # 9am Chicago is 16:00 Berlin: still ahead today
        at("America/Chicago", 2026, 7, 15, 9, 0),
    ),
    (
        "Claude usage limit reached. Your limit will reset at 12am.",
        at("Europe/Berlin", 2026, 7, 16, 0, 0),
    ),
    # "N-hour limit reached ∙ resets ..." (no zone: the detector's tz); 1am is past -> tomorrow
    ("5-hour limit reached ∙ resets 1am", at("Europe/Berlin", 2026, 7, 16, 1, 0)),
    ("5-hour limit reached ∙ resets 9pm", at("Europe/Berlin", 2026, 7, 15, 21, 0)),
    # Seoul is at 21:00: 10am there is tomorrow
    (
        "Weekly limit reached · resets 10am (Asia/Seoul) · /upgrade to Max or turn on /extra-usage",
        at("Asia/Seoul", 2026, 7, 16, 10, 0),
    ),
    (
        "Limit reached · resets 11:30am (Asia/Calcutta) · /upgrade to Max or turn on /extra-usage",
        at("Asia/Calcutta", 2026, 7, 16, 11, 30),
    ),
    # "You've hit your ... limit · resets ..."
    ("You've hit your limit · resets 8pm (Africa/Cairo)", at("Africa/Cairo", 2026, 7, 15, 20, 0)),
    (
        "You've hit your session limit · resets 12:50am (America/Los_Angeles)",
        at("America/Los_Angeles", 2026, 7, 16, 0, 50),
    ),
    (
        "You've hit your session limit · resets 5:40pm (Europe/Berlin)",
        at("Europe/Berlin", 2026, 7, 15, 17, 40),
    ),
    (
        "You've hit your weekly limit · resets Sep 15 at 7pm",
        at("Europe/Berlin", 2026, 9, 15, 19, 0),
    ),
    ("You've hit your weekly limit · resets Jul 31, 2am (UTC)", at("UTC", 2026, 7, 31, 2, 0)),
    (
        "You've hit your limit · resets Apr 23 at 4pm (America/Recife)",
        # 23 April has passed this year: next year's
        at("America/Recife", 2027, 4, 23, 16, 0),
    ),
    (
        "You've hit your limit · resets Jan 30, 11:30am (Asia/Calcutta)",
        at("Asia/Calcutta", 2027, 1, 30, 11, 30),
    ),
    # 1pm in Lisbon is right now: just reset, not tomorrow
    ("You've hit your limit · resets 1pm (Europe/Lisbon)", at("Europe/Lisbon", 2026, 7, 15, 13, 0)),
    # claude.ai wording with a typographic apostrophe and "9:30 AM"
    (
        "You’ve hit your limit for Claude messages. Limits will reset at 9:30 AM.  "
        "View your usage details.",
        at("Europe/Berlin", 2026, 7, 16, 9, 30),
    ),
    # extra usage
    (
        "You're out of extra usage · resets Feb 4, 8pm (Europe/Budapest)",
        at("Europe/Budapest", 2027, 2, 4, 20, 0),
    ),
    ("You're out of extra usage · resets 9pm", at("Europe/Berlin", 2026, 7, 15, 21, 0)),
    # API-key spend limit
    (
        'API Error: 400 {"type":"error","error":{"type":"invalid_request_error","message":"You '
        "have reached your specified API usage limits. You will regain access on 2026-04-01 at "
        '00:00 UTC."},"request_id":"req_011CZLrUfBVkVHn5T6EqQaf7"}',
        at("UTC", 2026, 4, 1, 0, 0),
    ),
]


@pytest.mark.parametrize(("line", "reset_at"), USAGE_CASES)
def test_usage_messages(detector: LimitDetector, line: str, reset_at: float | None) -> None:
    hit = detector.feed(line, NOW)
    assert hit == LimitHit("usage", reset_at, line)


def test_usage_line_keeps_line_without_newline(detector: LimitDetector) -> None:
    hit = detector.feed("5-hour limit reached ∙ resets 9pm\n", NOW)
    assert hit is not None
    assert hit.line == "5-hour limit reached ∙ resets 9pm"


def test_usage_without_reset_time(detector: LimitDetector) -> None:
    hit = detector.feed("You've hit your session limit", NOW)
    assert hit == LimitHit("usage", None, "You've hit your session limit")


RATE_CASES = [
    "API Error: 529 Overloaded. This is a server-side issue, usually temporary — try again in a "
    "moment. If it persists, check https://status.claude.com/.",
    'API Error: 529 {"type":"error","error":{"type":"overloaded_error","message":"Overloaded.',
    'API Error: 529 {"type": "error","error":{"type":"overloaded_error",'
    '"message":"Overloaded""}}\\',
    "API Error: Request rejected (429) · Rate limited",
    "API Error: Request rejected (429) · Rate limited. Please try again later.",
    "API Error: Request rejected (429) \u00b7 This request would exceed your organization's rate "
    "limit of 10,000 input tokens per minute",
    "API Error: Server is temporarily limiting requests (not your usage limit) · Rate limited",
    "  ⎿  API Error: Rate limit reached",
    'Error: 429 {"type":"error","error":{"type":"rate_limit_error","message":"This request would '
    "exceed your account's rate limit. Please try again later.\"}}",
]


@pytest.mark.parametrize("line", RATE_CASES)
def test_rate_messages(detector: LimitDetector, line: str) -> None:
    assert detector.feed(line, NOW) == LimitHit("rate", None, line)


ORDINARY = [
    "",
    "All 42 tests passed",
    "Reading supervisor/worker.py",
    "def rate_limit(calls: int) -> None:",
    "This PR fixes the 429 handling in the client",
    "    limit = config.limit or 100",
    # a warning, not a hit
    "Approaching usage limit resets at 2am",
    # Claude Code retrying on its own: only the final error counts
    '  ⎿  API Error (529 {"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}'
    ',"request_id":null}) · Retrying in 4 seconds… (attempt 4/10)',
    "{not json but braces} and nothing else",
]


@pytest.mark.parametrize("line", ORDINARY)
def test_ordinary_lines(detector: LimitDetector, line: str) -> None:
    assert detector.feed(line, NOW) is None


def test_many_lines_without_keywords_are_none(detector: LimitDetector) -> None:
    words = ["compiling", "module", "tests", "passed", "worker", "ok", "Reading", "diff", "--"]
    lines = [" ".join(words[(i + j) % len(words)] for j in range(i % 12)) for i in range(20_000)]
    assert all(not any(k in line for k in DEFAULT_KEYWORDS) for line in lines)
    assert [detector.feed(line, NOW) for line in lines] == [None] * len(lines)


# -- stream-json -------------------------------------------------------------------------------


def event(**fields: object) -> str:
    return json.dumps(fields, separators=(",", ":"), ensure_ascii=False)


def test_stream_json_result_usage(detector: LimitDetector) -> None:
    line = event(
        type="result",
        subtype="success",
        is_error=True,
        api_error_status=429,
        result="You've hit your weekly limit · resets Jul 18, 12pm (UTC)",
    )
    assert detector.feed(line, NOW) == LimitHit("usage", at("UTC", 2026, 7, 18, 12, 0), line)


def test_stream_json_result_rate(detector: LimitDetector) -> None:
    line = event(
        type="result",
        subtype="success",
        is_error=True,
        duration_api_ms=0,
        result="API Error: Rate limit reached",
        stop_reason="stop_sequence",
    )
    assert detector.feed(line + "\n", NOW) == LimitHit("rate", None, line)


def test_stream_json_result_status_only(detector: LimitDetector) -> None:
    line = event(type="result", subtype="success", is_error=True, api_error_status=529, result="?")
    assert detector.feed(line, NOW) == LimitHit("rate", None, line)


def test_stream_json_other_errors_are_not_limits(detector: LimitDetector) -> None:
    line = event(
        type="result",
        subtype="success",
        is_error=True,
        terminal_reason="api_error",
        api_error_status=403,
        result="Your organization has disabled Claude subscription access for Claude Code",
    )
    assert detector.feed(line, NOW) is None


def test_stream_json_successful_result_mentioning_limits(detector: LimitDetector) -> None:
    line = event(
        type="result",
        subtype="success",
        is_error=False,
        result="Done: the CLI now prints 'You've hit your limit · resets 3pm' on 429.",
    )
    assert detector.feed(line, NOW) is None


def test_stream_json_rate_limit_event_rejected(detector: LimitDetector) -> None:
    line = (
        '{"type":"rate_limit_event","rate_limit_info":{"status":"rejected","resetsAt":1778565600,'
        '"rateLimitType":"five_hour","overageStatus":"rejected","overageDisabledReason":'
        '"org_level_disabled_until","isUsingOverage":false}}'
    )
    assert detector.feed(line, NOW) == LimitHit("usage", 1778565600.0, line)


def test_stream_json_rate_limit_event_allowed_is_informational(detector: LimitDetector) -> None:
    line = (
        '{"type":"rate_limit_event","rate_limit_info":{"status":"allowed","resetsAt":1774447200,'
        '"rateLimitType":"five_hour","overageStatus":"rejected","overageDisabledReason":'
        '"org_level_disabled","isUsingOverage":false}}'
    )
    assert detector.feed(line, NOW) is None


def test_stream_json_synthetic_assistant_error(detector: LimitDetector) -> None:
    line = event(
        type="assistant",
        message={
            "model": "<synthetic>",
            "content": [
                {"type": "text", "text": "You've hit your limit · resets 8pm (Africa/Cairo)"}
            ],
        },
        error="rate_limit",
        is_api_error_message=True,
    )
    assert detector.feed(line, NOW) == LimitHit(
        "usage", at("Africa/Cairo", 2026, 7, 15, 20, 0), line
    )


def test_stream_json_agent_content_is_never_searched(detector: LimitDetector) -> None:
    # An agent editing code that contains the very messages: tool input and tool results.
    tool_use = event(
        type="assistant",
        message={
            "content": [
                {
                    "type": "tool_use",
                    "name": "Edit",
                    "input": {"new_string": 'msg = "You\'ve hit your limit · resets 3pm"'},
                }
            ]
        },
    )
    tool_result = event(
        type="user",
        message={
            "content": [
                {
                    "type": "tool_result",
                    "is_error": True,
                    "content": "Claude AI usage limit reached|1762952400\nAPI Error: 529",
                }
            ]
        },
    )
    assert detector.feed(tool_use, NOW) is None
    assert detector.feed(tool_result, NOW) is None


# -- configuration -----------------------------------------------------------------------------


def test_custom_patterns_without_keywords() -> None:
    detector = LimitDetector(
        LimitPatterns(usage=["quota exhausted until"], rate=["backend busy"]),  # type: ignore[arg-type]
        tz=TZ,
    )
    line = "Quota exhausted until the window resets 3pm"
    assert detector.feed(line, NOW) == LimitHit(
        "usage", at("Europe/Berlin", 2026, 7, 15, 15, 0), line
    )
    assert detector.feed("backend busy, try later", NOW) == LimitHit(
        "rate", None, "backend busy, try later"
    )
    assert detector.feed("You've hit your limit · resets 3pm", NOW) is None


def test_extra_pattern_keeps_defaults() -> None:
    patterns = LimitPatterns(usage=(*DEFAULT_USAGE_PATTERNS, r"monthly quota used up"))
    detector = LimitDetector(patterns, tz=TZ)
    assert detector.feed("monthly quota used up", NOW) is not None
    assert detector.feed("5-hour limit reached ∙ resets 9pm", NOW) is not None
    assert detector.feed("API Error: Rate limit reached", NOW) == LimitHit(
        "rate", None, "API Error: Rate limit reached"
    )


def test_explicit_keywords() -> None:
    patterns = LimitPatterns(usage=(r"quota gone",), rate=(), keywords=("quota",))
    detector = LimitDetector(patterns)
    assert detector.feed("quota gone", NOW) is not None
    assert detector.feed("QUOTA GONE", NOW) is None  # filtered by the (case-sensitive) keyword


def test_invalid_pattern_is_named() -> None:
    with pytest.raises(ValueError, match=r"invalid rate limit pattern '\(unclosed'"):
        LimitDetector(LimitPatterns(rate=("(unclosed",)))


def test_default_patterns_compile() -> None:
    LimitDetector(LimitPatterns(DEFAULT_USAGE_PATTERNS, DEFAULT_RATE_PATTERNS))


# -- parse_reset_time --------------------------------------------------------------------------


def test_parse_epoch() -> None:
    assert parse_reset_time("Claude AI usage limit reached|1750000000", NOW, TZ) == 1750000000.0


def test_parse_clock_today_and_tomorrow() -> None:
    assert parse_reset_time("resets 3pm", NOW, TZ) == at("Europe/Berlin", 2026, 7, 15, 15, 0)
    assert parse_reset_time("resets 5am", NOW, TZ) == at("Europe/Berlin", 2026, 7, 16, 5, 0)
    assert parse_reset_time("reset at 7:30pm", NOW, TZ) == at("Europe/Berlin", 2026, 7, 15, 19, 30)
    assert parse_reset_time("resets 12pm", NOW, TZ) == at("Europe/Berlin", 2026, 7, 16, 12, 0)
    assert parse_reset_time("resets 12am", NOW, TZ) == at("Europe/Berlin", 2026, 7, 16, 0, 0)


def test_parse_zone_in_parentheses_wins() -> None:
    assert parse_reset_time("resets 5am (Europe/Berlin)", NOW, ZoneInfo("UTC")) == at(
        "Europe/Berlin", 2026, 7, 16, 5, 0
    )
    assert parse_reset_time("resets 3pm (America/New_York)", NOW, TZ) == at(
        "America/New_York", 2026, 7, 15, 15, 0
    )


def test_parse_unknown_zone_falls_back_to_tz() -> None:
    assert parse_reset_time("resets 3pm (Mars/Olympus)", NOW, TZ) == at(
        "Europe/Berlin", 2026, 7, 15, 15, 0
    )


def test_parse_just_passed_is_today() -> None:
    five_past_two = NOW + 5 * 60
    assert parse_reset_time("resets 2pm", five_past_two, TZ) == NOW
    later = NOW + PAST_GRACE_SECONDS + 60
    assert parse_reset_time("resets 2pm", later, TZ) == at("Europe/Berlin", 2026, 7, 16, 14, 0)


def test_parse_across_dst_change() -> None:
    # Berlin leaves summer time in the night of 25 October 2026.
    before = datetime(2026, 10, 24, 22, 0, tzinfo=TZ).timestamp()
    assert parse_reset_time("resets 5am", before, TZ) == at("Europe/Berlin", 2026, 10, 25, 5, 0)
    assert (
        at("Europe/Berlin", 2026, 10, 25, 5, 0) - before == 8 * 3600
    )  # 7 wall-clock hours + 1 hour gained


def test_parse_local_zone_when_no_tz() -> None:
    expected = datetime.combine(
        datetime.fromtimestamp(NOW).date(), datetime.min.time().replace(hour=15)
    ).timestamp()
    if expected < NOW - PAST_GRACE_SECONDS:
        expected = datetime.combine(
            datetime.fromtimestamp(NOW + 86400).date(), datetime.min.time().replace(hour=15)
        ).timestamp()
    assert parse_reset_time("resets 3pm", NOW, None) == expected


def test_parse_iso() -> None:
    assert parse_reset_time("You will regain access on 2026-08-01 at 00:00 UTC.", NOW, TZ) == at(
        "UTC", 2026, 8, 1, 0, 0
    )


@pytest.mark.parametrize(
    "text", ["Rate limited", "resets soon", "resets 13pm", "resets 7:75pm", "resets Feb 30, 3pm"]
)
def test_parse_nothing(text: str) -> None:
    assert parse_reset_time(text, NOW, TZ) is None


def test_feed_batch_finds_the_hit_among_many_lines() -> None:
    now = 1_750_000_000.0
    detector = LimitDetector(tz=UTC)
    noise = [f"w1 l{n:09d} xxxxxxxx" for n in range(2000)]  # holds "429", "529" now and then
    assert detector.feed_batch(noise, now) is None
    rate = "API Error: 529 Overloaded. This is a server-side issue, usually temporary"
    usage = f"Claude AI usage limit reached|{int(now) + 3600}"
    hit = detector.feed_batch([*noise[:500], rate, *noise[500:], usage, "after"], now)
    assert hit is not None and hit.kind == "usage" and hit.reset_at == now + 3600
    hit = detector.feed_batch([*noise, rate], now)
    assert hit is not None and hit.kind == "rate"
    event = '{"type":"result","subtype":"success","is_error":true,"result":"' + usage + '"}'
    hit = detector.feed_batch(['{"type":"assistant"}', event], now)
    assert hit is not None and hit.kind == "usage"


def test_feed_batch_with_custom_anchored_patterns() -> None:
    detector = LimitDetector(LimitPatterns(usage=(r"^QUOTA GONE until (\d+)$",), rate=()))
    assert detector.feed_batch(["a", "QUOTA GONE until 5", "b"], 0.0) is not None
    assert detector.feed_batch(["a", "x QUOTA GONE until 5", "b"], 0.0) is None
