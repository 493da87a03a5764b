"""Answers the scheduler must not take at face value (DESIGN 8, issue 10 items 1, 2 and 4).

- an error code the API does not document as a verdict on a change: nothing inferred from it,
  a lone change dead-lettered only when the same answer repeats;
- lone 404s: held until a 2xx shows the API answers for real; a run of them stops sending;
- a request abandoned at its timeout: its IDs take no newer values until a grace has passed.
"""

from __future__ import annotations

import orjson

from tests.unit.factories import NOW_WALL, applied, not_found, rejected
from tests.unit.test_scheduler import feed, keys_of, scheduler, take
from worker.core.batch import Purpose
from worker.core.classify import Action, Verdict, classify, classify_failure
from worker.core.scheduler import OddAnswers


def odd_code(code: str = "9999") -> Verdict:
    """A 400 with an error code the API does not document."""
    body = orjson.dumps({"error": code, "errorMsg": "something else"})
    return classify(400, body, None, NOW_WALL)


def timed_out() -> Verdict:
    """A request given up at its timeout."""
    return classify_failure(TimeoutError("read timed out"))


class TestUndocumentedCodes:
    """A 400 with an undocumented code is no proof against any change in the request."""

    def test_group_is_sent_again_once(self) -> None:
        """A passing fault costs one more request of the same group, not a split."""
        s = scheduler()
        feed(s, 1, 2, 3, 4)
        s.draining = True
        settled = s.resolve(take(s, 0.0), odd_code(), 1.0)
        assert settled.retry_in_s is not None
        again = take(s, 1.0 + settled.retry_in_s)
        assert ["1", "2", "3", "4"] == again.keys
        assert (["1", "2", "3", "4"], []) == keys_of(s.resolve(again, applied(), 2.0))
        assert s.idle

    def test_group_is_split_in_halves_both_sent(self) -> None:
        """The same answer twice: split, and both halves go (an applied first half proves
        nothing about the second)."""
        s = scheduler()
        feed(s, 1, 2, 3, 4)
        s.draining = True
        settled = s.resolve(take(s, 0.0), odd_code(), 1.0)
        assert ([], []) == keys_of(settled)
        settled = s.resolve(take(s, 10.0), odd_code(), 10.0)
        assert ([], []) == keys_of(settled)
        first, second = take(s, 10.0), take(s, 10.0)
        assert (["1", "2"], ["3", "4"]) == (first.keys, second.keys)
        assert (Purpose.ISOLATE, Purpose.ISOLATE) == (first.purpose, second.purpose)
        assert (["1", "2"], []) == keys_of(s.resolve(first, applied(), 11.0))
        assert (["3", "4"], []) == keys_of(s.resolve(second, applied(), 11.0))
        assert 0 == s.stats.inferred_culprits
        assert s.idle

    def test_lone_change_is_resent_until_the_same_answer_repeats(self) -> None:
        """A lone change is dead-lettered ``rejected`` only at the third identical answer."""
        s = scheduler(confirm_tries=3)
        feed(s, 5)
        s.draining = True
        batch = take(s, 0.0)
        now = 0.0
        for _ in range(2):
            settled = s.resolve(batch, odd_code(), now)
            assert ([], []) == keys_of(settled)
            assert settled.retry_in_s is not None and settled.retry_in_s > 0
            now += settled.retry_in_s
            batch = take(s, now)
            assert ["5"] == batch.keys
        settled = s.resolve(batch, odd_code(), now)
        assert ([], ["5"]) == keys_of(settled)
        letter = settled.dead[0]
        assert ("rejected", 400, "9999") == (letter.reason, letter.status, letter.error)
        assert letter.detail is not None and "3 times" in letter.detail
        assert 2 == s.stats.confirmations
        assert s.idle

    def test_a_passing_fault_costs_no_valid_change(self) -> None:
        """An undocumented answer once, then a 204: applied, nothing dead-lettered."""
        s = scheduler()
        feed(s, 5)
        s.draining = True
        settled = s.resolve(take(s, 0.0), odd_code(), 0.0)
        assert settled.retry_in_s is not None
        assert (["5"], []) == keys_of(s.resolve(take(s, 10.0), applied(), 10.0))
        assert {} == dict(s.stats.dead_letters)

    def test_an_unknown_id_still_ends_not_found(self) -> None:
        """Undocumented code first, then the API's 404: the ID is dead-lettered not_found."""
        s = scheduler()
        feed(s, 5)
        s.draining = True
        s.resolve(take(s, 0.0), odd_code(), 0.0)
        settled = s.resolve(take(s, 10.0), not_found(), 10.0)
        assert ([], ["5"]) == keys_of(settled)
        assert "not_found" == settled.dead[0].reason

    def test_different_answers_restart_the_count(self) -> None:
        """Only the same answer in a row counts: 9999, 8888, 8888 is not yet three 8888s."""
        s = scheduler(confirm_tries=3)
        feed(s, 5)
        s.draining = True
        now = 0.0
        for code in ("9999", "8888", "8888"):
            settled = s.resolve(take(s, now), odd_code(code), now)
            assert [] == settled.dead
            now += 100.0
        assert ([], ["5"]) == keys_of(s.resolve(take(s, now), odd_code("8888"), now))

    def test_documented_data_errors_stay_immediate(self) -> None:
        """139 on a lone change is the API's verdict on it: dead at once."""
        s = scheduler()
        feed(s, 5)
        s.draining = True
        assert ([], ["5"]) == keys_of(s.resolve(take(s, 0.0), rejected(), 0.0))


class TestNotFoundRun:
    """Lone 404s wait for a 2xx before they are dead letters; a run of them stops sending."""

    def lone_404s(self, count: int, limit: int) -> tuple[object, list[object]]:
        s = scheduler(max_items=1, max_not_found_run=limit)
        feed(s, *range(1, count + 1))
        s.draining = True
        settled = [s.resolve(take(s, 0.0), not_found(), 0.0) for _ in range(count)]
        return s, settled

    def test_held_until_a_2xx(self) -> None:
        """Three lone 404s write nothing; the next applied request releases them."""
        s = scheduler(max_items=1, max_not_found_run=10)
        feed(s, 1, 2, 3, 4)
        s.draining = True
        for _ in range(3):
            assert ([], []) == keys_of(s.resolve(take(s, 0.0), not_found(), 0.0))
        assert not s.idle
        settled = s.resolve(take(s, 0.0), applied(), 1.0)
        assert (["4"], ["1", "2", "3"]) == keys_of(settled)
        assert s.idle

    def test_run_reaching_the_limit_stops_with_nothing_dead(self) -> None:
        """The tenth lone 404 with no 2xx in between is fatal; none of them is dead-lettered."""
        s, settled = self.lone_404s(10, 10)
        assert all(not letters.dead for letters in settled)
        assert settled[-1].fatal is not None
        assert Action.FOREIGN == settled[-1].fatal.action
        assert "--api-url" in (settled[-1].fatal.detail or "")
        assert None is s.next_batch(1.0)

    def test_quiet_releases_them(self) -> None:
        """With nothing left that could bring a 2xx, the held 404s become dead letters."""
        s, _ = self.lone_404s(3, 10)
        quiet = s.settle_due(1.0)
        assert quiet is not None
        assert ([], ["1", "2", "3"]) == keys_of(quiet)
        assert s.idle
        assert None is s.settle_due(2.0)

    def test_not_quiet_while_a_request_is_out(self) -> None:
        """A request still out may be the 2xx that confirms them: not yet."""
        s = scheduler(max_items=1, max_not_found_run=10)
        feed(s, 1, 2)
        s.draining = True
        first, second = take(s, 0.0), take(s, 0.0)
        s.resolve(first, not_found(), 0.0)
        assert None is s.settle_due(0.0)
        s.resolve(second, applied(), 0.0)
        assert s.idle

    def test_a_slow_trickle_still_stops(self) -> None:
        """Lone 404s that come one at a time are written as they go quiet, but stay in the
        run: only a 2xx ends it, so the third in a row stops (and is not written)."""
        s = scheduler(max_items=1, max_not_found_run=3)
        written = []
        for i in range(1, 4):
            feed(s, i)
            settled = s.resolve(take(s, 0.0), not_found(), 0.0)
            quiet = s.settle_due(0.0)
            written += [] if quiet is None else keys_of(quiet)[1]
        assert ["1", "2"] == written
        assert settled.fatal is not None and Action.FOREIGN == settled.fatal.action

    def test_a_2xx_ends_the_run(self) -> None:
        """Two lone 404s, a 2xx, two more: no stop at a limit of 3."""
        s = scheduler(max_items=1, max_not_found_run=3)
        feed(s, 1, 2, 3, 4, 5)
        for verdict in (not_found(), not_found(), applied(), not_found(), not_found()):
            assert None is s.resolve(take(s, 0.0), verdict, 0.0).fatal

    def test_ids_known_missing_are_dead_at_once(self) -> None:
        """An ID found missing earlier (a confirmed 404 on it alone) seen again is
        dead-lettered without a request, citing that answer, and counts for no run: a 2xx
        proved the URL when it was learnt."""
        s = scheduler(max_items=1, max_not_found_run=2)
        feed(s, 1, 2)
        s.resolve(take(s, 0.0), not_found(), 0.0)
        s.resolve(take(s, 0.0), applied(), 0.0)  # confirms 1 as missing
        for value in ("b", "c", "d"):
            feed(s, 1, value=value)
            assert 1.0 == s.next_batch(1.0)  # no request: a dead letter to settle
            settled = s.settle_due(1.0)
            assert settled is not None and ([], ["1"]) == keys_of(settled)
            assert None is settled.fatal
            assert "earlier 404" in (settled.dead[0].detail or "")
        assert s.idle

    def test_undocumented_rejections_in_a_row_stop_too(self) -> None:
        """Lone changes rejected with an undocumented code, nothing applied in between,
        count as a run as well: an API answering 9999 to everything does not reject the
        whole input."""
        s = scheduler(max_items=1, max_not_found_run=3, confirm_tries=1)
        feed(s, 1, 2, 3)
        s.draining = True
        results = [s.resolve(take(s, 0.0), odd_code(), 0.0) for _ in range(3)]
        assert all(not r.dead for r in results)
        fatal = results[-1].fatal
        assert fatal is not None and Action.FOREIGN == fatal.action
        assert "400/9999" in (fatal.detail or "")

    def test_zero_turns_the_guard_off(self) -> None:
        """With 0 every lone 404 is a dead letter at once."""
        _, settled = self.lone_404s(12, 0)
        assert all(len(letters.dead) == 1 and letters.fatal is None for letters in settled)


class TestTimeoutGrace:
    """IDs of an abandoned request take no newer values until the grace has passed."""

    def test_newer_change_waits_for_the_grace(self) -> None:
        """Timeout at t=1, retry applied at t=2: the newer change goes at t=1+grace, not t=2,
        and the applied change is acknowledged only then (its partition stays held)."""
        s = scheduler(timeout_grace_s=60.0, linger_s=0.0)
        feed(s, 1, value="old")
        batch = take(s, 0.0)
        s.resolve(batch, timed_out(), 1.0)
        feed(s, 1, now=1.5, value="new")
        retry = take(s, 2.0)
        assert b'[{"ID":1,"extra1":"old"}]' == retry.body()
        assert ([], []) == keys_of(s.resolve(retry, applied(), 2.0))
        assert None is s.settle_due(30.0)
        assert 61.0 == s.next_batch(2.0)
        assert 61.0 == s.next_batch(30.0)
        due = s.settle_due(61.0)
        assert due is not None and (["1"], []) == keys_of(due)
        newer = take(s, 61.0)
        assert b'[{"ID":1,"extra1":"new"}]' == newer.body()
        assert 1 == s.stats.fenced

    def test_no_newer_change_no_wait_at_the_end(self) -> None:
        """Once the input is drained a fence with nothing waiting behind it holds nothing:
        its change is acknowledged at once."""
        s = scheduler(timeout_grace_s=60.0, linger_s=0.0)
        feed(s, 1)
        s.resolve(take(s, 0.0), timed_out(), 1.0)
        s.resolve(take(s, 2.0), applied(), 2.0)
        assert not s.idle
        s.draining = True
        due = s.settle_due(2.0)
        assert due is not None and (["1"], []) == keys_of(due)
        assert s.idle

    def test_shutdown_forgets_what_waits_behind_a_fence(self) -> None:
        """SIGTERM does not wait out a grace: the newer change is forgotten (unacknowledged,
        read again at the next start), the applied one acknowledged."""
        s = scheduler(timeout_grace_s=60.0, linger_s=0.0)
        feed(s, 1, value="old")
        s.resolve(take(s, 0.0), timed_out(), 1.0)
        s.resolve(take(s, 2.0), applied(), 2.0)
        feed(s, 1, now=3.0, value="new")
        s.draining = True
        forgotten = s.drop_fenced()
        assert [["1:new"]] == [entry.tokens for entry in forgotten]
        due = s.settle_due(3.0)
        assert due is not None and (["1"], []) == keys_of(due)
        assert s.idle

    def test_refused_connection_needs_no_grace(self) -> None:
        """A request that never left cannot be applied late: the newer change goes at once."""
        s = scheduler(timeout_grace_s=60.0, linger_s=0.0)
        feed(s, 1, value="old")
        s.resolve(take(s, 0.0), classify_failure(ConnectionRefusedError()), 1.0)
        feed(s, 1, now=1.5, value="new")
        s.resolve(take(s, 2.0), applied(), 2.0)
        assert b'[{"ID":1,"extra1":"new"}]' == take(s, 2.0).body()

    def test_split_parts_inherit_the_fence(self) -> None:
        """An abandoned batch later split by a 404: its applied parts are fenced too."""
        s = scheduler(timeout_grace_s=60.0, linger_s=0.0)
        feed(s, 1, 2, value="old")
        s.resolve(take(s, 0.0), timed_out(), 1.0)
        s.resolve(take(s, 2.0), not_found(), 2.0)
        feed(s, 1, now=2.5, value="new")
        first = take(s, 3.0)
        assert ["1"] == first.keys
        s.resolve(first, applied(), 3.0)
        assert 61.0 == s.next_batch(3.0)


class TestOddAnswerNoise:
    """The tries a lone change needs follow how often a retry contradicted that answer."""

    def test_never_contradicted_needs_the_least(self) -> None:
        """An answer that always repeats is a verdict after ``confirm_tries``."""
        odd = OddAnswers()
        for _ in range(50):
            odd.answered((400, "9999"), odd_code())
        assert 3 == odd.tries((400, "9999"), 3)

    def test_noise_at_20_percent_needs_ten(self) -> None:
        """Repeated once in 5 retries: the first answer and 9 repeats (0.2 ** 9 < 1e-6)."""
        odd = OddAnswers()
        for i in range(100):
            odd.answered((400, "9999"), odd_code() if i % 5 == 0 else applied())
        assert 10 == odd.tries((400, "9999"), 3)
        assert 3 == odd.tries((400, "8888"), 3)  # another code has its own record

    def test_mostly_repeated_is_capped(self) -> None:
        """Repeated 99 times in 100: at most 20 tries."""
        odd = OddAnswers()
        for i in range(100):
            odd.answered((400, "9999"), applied() if i == 0 else odd_code())
        assert 20 == odd.tries((400, "9999"), 3)

    def test_never_repeated_needs_the_least(self) -> None:
        """Always contradicted: a repeat by chance is then all but impossible."""
        odd = OddAnswers()
        odd.answered((400, "9999"), applied())
        assert 3 == odd.tries((400, "9999"), 3)

    def test_scheduler_asks_for_more_when_answers_are_noise(self) -> None:
        """9999 repeated by a retry once, contradicted once: the next lone change needs
        more than 3 identical answers."""
        s = scheduler(confirm_tries=3)
        feed(s, 1, 2)
        s.draining = True
        s.resolve(take(s, 0.0), odd_code(), 0.0)
        s.resolve(take(s, 10.0), odd_code(), 10.0)  # repeated: split in halves
        s.resolve(take(s, 10.0), applied(), 11.0)
        s.resolve(take(s, 10.0), applied(), 11.0)
        feed(s, 3, 4)
        s.resolve(take(s, 12.0), odd_code(), 12.0)
        s.resolve(take(s, 20.0), applied(), 20.0)  # contradicted by the retry
        feed(s, 5)
        now = 20.0
        for _ in range(5):
            settled = s.resolve(take(s, now), odd_code(), now)
            assert [] == settled.dead
            now += 100.0
