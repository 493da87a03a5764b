"""The capacity model: which limit binds, coalescing, isolation, retries and replicas."""

from __future__ import annotations

import argparse
import json

import pytest

import worker.bench.model as model
from worker.bench.bounds import SPLITTING, information_bound, requests_per_contact
from worker.bench.model import PlanInputs, coalesced_sends, early_sends, fresh_per_contact, plan
from worker.bench.plan_cli import configure_parser, main
from worker.core.grouptest import fresh_riders


class TestModel:
    def test_rate_bound_backlog(self) -> None:
        """10,000 distinct IDs, batch 100, 20 requests/s: 100 requests and the start-up
        check in 101 / 20 s (the schedule has no burst) and the last one's latency."""
        inputs = PlanInputs(api_rate=20, backlog=10_000, contacts=10_000, latency_ms=20)
        result = plan(inputs)
        assert result.requests == pytest.approx(100)
        assert result.bottleneck == "api_rate"
        assert result.drain_s == pytest.approx(101 / 20 + 0.021)
        assert result.bound_requests == 100

    @pytest.mark.parametrize(
        ("rate", "backlog", "per_hour"), [(5, 2_000, 0), (20, 50_000, 0), (10, 0, 2_000_000)]
    )
    def test_never_plans_above_the_rate(self, rate: float, backlog: int, per_hour: int) -> None:
        """Whatever the input (a backlog, an inflow far above what the rate carries), the
        plan's requests per second and per hour stay within the rate limit."""
        result = plan(
            PlanInputs(
                api_rate=rate,
                backlog=backlog,
                contacts=backlog or None,
                changes_per_hour=per_hour,
                batch_size=1,
            )
        )
        assert result.requests_per_s <= rate
        assert result.requests_per_hour <= rate * 3600
        assert result.utilisation is not None and result.utilisation <= 1.0

    def test_worker_rate_below_the_api(self) -> None:
        """The lower of the worker's and the API's rate binds."""
        result = plan(PlanInputs(api_rate=50, worker_rate=10, backlog=5_000, contacts=5_000))
        assert result.rate == 10

    def test_latency_bound(self) -> None:
        """With no rate limit and a slow API, concurrency and latency bind."""
        result = plan(
            PlanInputs(
                api_rate=0,
                latency_ms=199,
                concurrency=4,
                backlog=10_000,
                contacts=10_000,
                overhead_ms=1,
            )
        )
        assert result.bottleneck == "latency"
        assert result.latency_s == pytest.approx(100 * 0.2 / 4)

    def test_cpu_bound(self) -> None:
        """With a fast API and no rate limit, the worker's one core binds."""
        result = plan(
            PlanInputs(
                api_rate=0,
                latency_ms=0,
                backlog=1_000_000,
                contacts=200_000,
                cpu_us_per_change=10,
                cpu_us_per_request=0,
            )
        )
        assert result.bottleneck == "cpu"
        assert result.cpu_s == pytest.approx(10.0)

    def test_batches_sent_while_the_backlog_is_read(self) -> None:
        """The burst goes before the backlog is read: its IDs' later changes go again."""
        once = plan(PlanInputs(api_rate=20, backlog=10_000, contacts=10_000))
        thrice = plan(PlanInputs(api_rate=20, backlog=30_000, contacts=10_000))
        assert (
            early_sends(PlanInputs(api_rate=20, backlog=10_000, contacts=10_000), 10_000, 20) == 0
        )
        assert once.sends == 10_000
        assert 10_000 < thrice.sends < 10_000 + 25 * 100

    def test_coalescing(self) -> None:
        """A backlog that fits the window needs one update per distinct ID that appears;
        a larger one merges only within the window of max_waiting changes."""
        assert coalesced_sends(50_000, 10_000, 50_000) == 10_000
        assert coalesced_sends(1_000_000, 200_000, 50_000) == pytest.approx(800_000)
        assert coalesced_sends(0, 10, 10) == 0

    def test_unknown_ids_cost_isolation(self) -> None:
        """Fresh IDs cost the expected requests of generalized binary splitting for their
        unknown share: 10,000 contacts at 1% in about 1.004 times the bound of 808."""
        result = plan(
            PlanInputs(
                api_rate=10, backlog=10_000, contacts=10_000, unknown_share=0.01, max_waiting=10_000
            )
        )
        assert result.requests_new == pytest.approx(100, abs=1)
        searched = 10_000 * requests_per_contact(100, 0.01, SPLITTING)
        assert result.requests_isolation == pytest.approx(searched - 100, rel=0.01)
        assert result.requests_new + result.requests_isolation <= 1.01 * 808
        assert result.bound_requests == pytest.approx(808, abs=1)

    def test_errors_cost_retries(self) -> None:
        """A share e of failing requests costs 1 / (1 - e) attempts each."""
        result = plan(PlanInputs(api_rate=10, backlog=10_000, contacts=10_000, error_rate=0.2))
        assert result.requests == pytest.approx(100 / 0.8)

    def test_replicas_for_a_drain_target(self) -> None:
        """Latency-bound: replicas scale; rate-bound: more replicas cannot help."""
        slow = PlanInputs(
            api_rate=1000,
            latency_ms=999,
            concurrency=1,
            backlog=10_000,
            contacts=10_000,
            target_drain_s=26,
        )
        assert plan(slow).replicas == 4
        limited = PlanInputs(api_rate=1, backlog=10_000, contacts=10_000, target_drain_s=10)
        result = plan(limited)
        assert result.replicas is None
        assert "rate limit" in result.replicas_note

    def test_replicas_for_an_hourly_volume(self) -> None:
        """Without a backlog the capacity is an hour's inflow drained at once: a slow API
        needs more workers; a rate-bound account cannot be helped by them."""
        slow = plan(
            PlanInputs(
                api_rate=0, latency_ms=399, concurrency=1, overhead_ms=1, changes_per_hour=3_500_000
            )
        )
        assert slow.capacity_changes_per_hour == pytest.approx(900_000, rel=0.01)
        assert slow.replicas == 4
        limited = plan(PlanInputs(api_rate=1, changes_per_hour=3_600_000))
        assert limited.replicas is None
        assert "more workers do not help" in limited.replicas_note
        easy = plan(PlanInputs(api_rate=100, changes_per_hour=1_000))
        assert easy.replicas == 1

    def test_steady_inflow(self) -> None:
        """36,000 changes/hour (10/s) with linger 200 ms: about 3 per request."""
        result = plan(PlanInputs(api_rate=10, changes_per_hour=36_000, linger_ms=200))
        assert result.requests_per_hour == pytest.approx(36_000 / 3)
        assert result.utilisation == pytest.approx(12_000 / 3600 / 10)

    @pytest.mark.parametrize(
        "bad",
        [
            {"api_rate": -1},
            {"api_rate": 1, "batch_size": 0},
            {"api_rate": 1, "unknown_share": 1.0},
            {"api_rate": 1, "backlog": 10, "contacts": 11},
            {"api_rate": 1, "target_drain_s": 0},
        ],
    )
    def test_rejects_inputs_that_do_not_fit(self, bad: dict[str, float]) -> None:
        """Impossible inputs are refused with a reason."""
        with pytest.raises(ValueError):
            PlanInputs(**bad)  # type: ignore[arg-type]


class TestSearchesWithRiders:
    """Where a search's steps carry riders (a low unknown share), the model prices fresh IDs
    by running the scheduler on a sample: cheaper than splitting without riders, never below
    the information bound; elsewhere the closed form as before."""

    def test_riders_priced_from_the_scheduler(self) -> None:
        p = 0.001
        with_riders = fresh_per_contact(100, p)
        assert with_riders < requests_per_contact(100, p, SPLITTING)
        assert with_riders > information_bound(1, p, 100)
        assert with_riders < 1.5 * information_bound(1, p, 100)  # issue 13's goal

    def test_riders_priced_only_where_the_worker_takes_them(
        self, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The worker decides on riders with its batch size, not with how full a steady
        inflow's batches are (6 here): at 1 % it takes none, and none are priced (review)."""
        assert 0 == fresh_riders(0.01, 100)

        def no_riders_here(batch_size: int, unknown_share: float) -> float:
            raise AssertionError(f"riders priced at a fill of {batch_size}, p={unknown_share}")

        monkeypatch.setattr(model, "_with_riders", no_riders_here)
        plan(PlanInputs(api_rate=10, unknown_share=0.01, changes_per_hour=90_000))

    def test_closed_form_where_no_riders(self) -> None:
        for p in (0.0, 0.01, 0.05):
            assert requests_per_contact(100, p, SPLITTING) == fresh_per_contact(100, p)


def run_plan(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser()
    configure_parser(parser)
    code = main(parser.parse_args(list(argv)))
    out, err = capsys.readouterr()
    return code, out, err


class TestPlanCommand:
    def test_json_has_drain_s_and_requests(self, capsys: pytest.CaptureFixture[str]) -> None:
        """--json prints the prediction, drain_s and requests among it."""
        code, out, _ = run_plan(
            capsys,
            "--api-rate",
            "20",
            "--latency-ms",
            "20",
            "--batch-size",
            "100",
            "--concurrency",
            "8",
            "--backlog",
            "50000",
            "--contacts",
            "10000",
            "--unknown-share",
            "0.01",
            "--json",
        )
        assert code == 0
        data = json.loads(out)
        assert data["drain_s"] > 0 and data["requests"] > 100
        assert data["inputs"]["unknown_share"] == 0.01

    def test_text(self, capsys: pytest.CaptureFixture[str]) -> None:
        """Without --json: a readable summary naming the bottleneck and what unknown IDs
        cost against the information bound."""
        code, out, _ = run_plan(
            capsys, "--api-rate", "20", "--backlog", "1000", "--unknown-share", "0.05"
        )
        assert code == 0
        assert "drain time" in out and "api_rate" in out and "groups of 16" in out
        assert "x the information bound" in out
        assert "riders" not in out

    def test_text_says_riders_at_a_very_low_share(self, capsys: pytest.CaptureFixture[str]) -> None:
        """At 0.1 % unknown the summary says that a search's requests carry riders, and prices
        them (under the 1.51x that splitting without them would cost); at 1 % they do not."""
        code, out, _ = run_plan(
            capsys, "--api-rate", "20", "--backlog", "1000", "--unknown-share", "0.001"
        )
        assert code == 0
        assert "groups of 100" in out and "riders" in out
        times = float(out.split(" requests per contact, ")[1].split("x the")[0])
        assert 1.0 < times < 1.5
        code, out, _ = run_plan(
            capsys, "--api-rate", "20", "--backlog", "1000", "--unknown-share", "0.01"
        )
        assert code == 0 and "riders" not in out

    def test_inputs_that_do_not_fit(self, capsys: pytest.CaptureFixture[str]) -> None:
        """More contacts than changes: exit 2 and the reason."""
        code, _, err = run_plan(capsys, "--api-rate", "20", "--backlog", "10", "--contacts", "11")
        assert code == 2
        assert "contacts cannot exceed the backlog" in err

    def test_bad_flag_value(self) -> None:
        """A negative rate is a usage error."""
        parser = argparse.ArgumentParser()
        configure_parser(parser)
        with pytest.raises(SystemExit):
            parser.parse_args(["--api-rate", "-1"])
