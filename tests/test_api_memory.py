"""Memory and time of a real `ptd serve` under hostile bodies (issue 13, class 5), measured from
outside: the server's peak RSS (`VmHWM`, reset before each measure through
`/proc/<pid>/clear_refs`), as `python -m benchmarks.memory` measures the figures of
docs/OPERATIONS.md. Small limits keep it quick (4 MiB bodies, seconds in all); the bounds are
generous: they fail on the behaviour before the fix (7 s and hundreds of MB for 0.6 MB of empty
invoice objects; concurrent bodies all in memory at once), not on noise."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from benchmarks.memory import (
    floats_and_dicts_body,
    histories_body,
    hostile_body,
    peak_rss,
    post,
    post_all,
    ptd_serve,
    reset_peak,
    rss,
    short_strings_body,
    small_dicts_body,
)

MIB = 1024 * 1024
LIMIT = 4 * MIB

pytestmark = pytest.mark.skipif(
    not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to read peak RSS"
)


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[int, int]]:
    env = {"PTD_MAX_BODY_BYTES": str(LIMIT), "PTD_MAX_INFLIGHT_BODY_BYTES": str(LIMIT)}
    with ptd_serve(env) as (port, process):
        warm, _ = histories_body(300_000)
        assert post(port, "/api/predict_batch", warm)[0] == 200  # pandas loaded, as in use
        if not reset_peak(process.pid):
            pytest.skip("the kernel does not let this user reset the peak RSS")
        yield port, process.pid


def cost(server: tuple[int, int], bodies: list[bytes]) -> tuple[list[int], float, int]:
    """Statuses, the slowest answer's seconds and the peak RSS growth (bytes) of sending
    `bodies` at once."""
    port, pid = server
    reset_peak(pid)
    before = rss(pid)
    answers = post_all(port, "/api/predict_batch", bodies)
    return [a[0] for a in answers], max(a[3] for a in answers), peak_rss(pid) - before


def test_a_hostile_batch_costs_about_what_a_good_one_does(server: tuple[int, int]) -> None:
    good, records = histories_body(2 * MIB)
    assert records > 50
    cost(server, [good])  # once to settle the allocator
    statuses, good_seconds, good_growth = cost(server, [good])
    assert statuses == [200]
    hostile = [
        (hostile_body("0", len(good)), 200),  # parsed: every record its own error
        (short_strings_body(len(good)), 413),  # parsed, the densest shape left: too many records
        (small_dicts_body(len(good)), 413),
        (floats_and_dicts_body(len(good)), 413),  # the most memory per byte found
        (hostile_body("{}", len(good)), 400),  # refused unparsed: too many objects
        (hostile_body('{"a":0}', len(good)), 400),
        (hostile_body("[]", len(good)), 400),
    ]
    for body, status in hostile:
        assert len(good) - 20_000 < len(body) <= len(good)
        statuses, seconds, growth = cost(server, [body])
        assert statuses == [status], body[:80]
        assert seconds < 3 * good_seconds + 1.0, (body[:80], seconds, good_seconds)
        assert growth < 3 * good_growth + 32 * MIB, (body[:80], growth, good_growth)
    # Records of empty invoice objects, in a body small enough to be parsed: each is answered
    # with its own error, not a silent pass.
    port, _ = server
    _, _, content, _ = post(port, "/api/predict_batch", hostile_body("{}", 10_000))
    body = json.loads(content)
    assert body["scored"] == 0 and body["failed"] == len(body["results"]) > 0
    assert {r["error"]["code"] for r in body["results"]} == {"missing_field"}


def test_concurrent_worst_bodies_stay_within_the_budget(server: tuple[int, int]) -> None:
    """Six bodies of the largest size at once: with a budget of one body in work they are
    worked on one after the other, so the peak is about one body's, not six."""
    body = short_strings_body(LIMIT)  # the most memory per byte among bodies that are parsed
    _, _, single = cost(server, [body])
    statuses, _, together = cost(server, [body] * 6)
    assert statuses == [413] * 6
    assert together < 1.5 * single + 32 * MIB, (together, single)
