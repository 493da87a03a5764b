"""Scenario files: good ones become variants, bad ones fail with a message naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from worker.bench.scenario import (
    PACKAGED,
    ScenarioError,
    load_scenario,
    packaged_scenarios,
    parse_scenario,
)

SCENARIOS = Path(__file__).resolve().parents[2] / "worker" / "bench" / "scenarios"


def write(tmp_path: Path, text: str, name: str = "s.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


class TestGoodFiles:
    def test_defaults_and_name_from_the_file(self, tmp_path: Path) -> None:
        """An empty file is one variant with every default, named after the file."""
        scenario = load_scenario(write(tmp_path, "", "quiet.toml"))
        assert scenario.name == "quiet"
        assert [v.label for v in scenario.variants] == ["quiet"]
        variant = scenario.variants[0]
        assert variant.worker.batch_size == 100
        assert variant.stream.distribution == "uniform"
        assert variant.api.rate_limit == 0.0

    def test_sections(self, tmp_path: Path) -> None:
        """Every section's keys land in their dataclass, numbers widened where needed."""
        text = """
name = "mine"
description = "d"
[stream]
changes = 1_000
contacts = 100
distribution = "zipf"
unknown_share = 0.05
invalid_share = 0.01
arrival_rate = 50
[api]
latency = 20
rate_limit = 10
error_rate = 0.1
[worker]
batch_size = 25
linger_ms = 5
rate = 12
[baselines]
kinds = ["per-change"]
max_changes = 10
[run]
time_goal = 1.111
"""
        scenario = load_scenario(write(tmp_path, text))
        v = scenario.variants[0]
        assert (scenario.name, scenario.description) == ("mine", "d")
        assert (v.stream.changes, v.stream.distribution, v.stream.invalid) == (1000, "zipf", 10)
        assert (v.api.latency, v.api.rate_limit, v.api.error_rate) == ("20", 10.0, 0.1)
        assert (v.worker.batch_size, v.worker.linger_ms, v.worker.rate) == (25, 5.0, 12.0)
        assert v.baselines.kinds == ("per-change",)
        assert v.run.time_goal == 1.111

    def test_baseline_lines_per_kind(self, tmp_path: Path) -> None:
        """max_changes may be one number for all baselines or a table per baseline."""
        text = "[baselines]\nmax_changes = { per-change = 50, batch-fallback = 500 }\n"
        baselines = load_scenario(write(tmp_path, text)).variants[0].baselines
        assert baselines.lines_for("per-change") == 50
        assert baselines.lines_for("batch-fallback") == 500
        text = '[baselines]\nmax_changes = 70\nkinds = ["per-change"]\n'
        baselines = load_scenario(write(tmp_path, text)).variants[0].baselines
        assert (baselines.lines_for("per-change"), baselines.lines_for("batch-fallback")) == (70, 0)

    def test_sweep(self, tmp_path: Path) -> None:
        """A sweep makes one variant per value, the rest of the settings shared."""
        text = """
[worker]
rate = 7
[sweep]
parameter = "stream.unknown_share"
values = [0.001, 0.01]
labels = ["low", "high"]
"""
        scenario = load_scenario(write(tmp_path, text))
        assert scenario.sweep == "stream.unknown_share"
        assert [(v.label, v.stream.unknown_share) for v in scenario.variants] == [
            ("low", 0.001),
            ("high", 0.01),
        ]
        assert all(v.worker.rate == 7 for v in scenario.variants)

    def test_sweep_labels_default_to_key_and_value(self, tmp_path: Path) -> None:
        """Without labels a variant is named key=value."""
        text = '[sweep]\nparameter = "worker.batch_size"\nvalues = [10, 20]\n'
        labels = [v.label for v in load_scenario(write(tmp_path, text)).variants]
        assert labels == ["batch_size=10", "batch_size=20"]

    def test_variants_override_keys(self, tmp_path: Path) -> None:
        """Each [[variants]] entry overrides only the keys it names."""
        text = """
[worker]
rate = 25
batch_size = 50
[[variants]]
label = "a"
[[variants]]
label = "b"
worker.rate = 40
api.rate_limit = 20
"""
        a, b = load_scenario(write(tmp_path, text)).variants
        assert (a.worker.rate, a.worker.batch_size, a.api.rate_limit) == (25, 50, 0)
        assert (b.worker.rate, b.worker.batch_size, b.api.rate_limit) == (40, 50, 20)

    @pytest.mark.parametrize("path", sorted(SCENARIOS.glob("*.toml")), ids=lambda p: p.stem)
    def test_shipped_scenarios_parse(self, path: Path) -> None:
        """Every scenario in worker/bench/scenarios is valid."""
        scenario = load_scenario(path)
        assert scenario.variants

    def test_the_issue_scenarios_are_shipped(self) -> None:
        """steady, stale-ids, rate-limited, flaky, backlog-1m and light-load exist."""
        names = {p.stem for p in SCENARIOS.glob("*.toml")}
        assert {"steady", "stale-ids", "rate-limited", "flaky", "backlog-1m", "light-load"} <= names
        shares = [
            v.stream.unknown_share for v in load_scenario(SCENARIOS / "stale-ids.toml").variants
        ]
        assert shares == [0.001, 0.01, 0.05]
        backlog = load_scenario(SCENARIOS / "backlog-1m.toml").variants[0].stream
        assert (backlog.changes, backlog.contacts) == (1_000_000, 200_000)

    def test_recurring_ids_is_a_restart(self) -> None:
        """recurring-ids runs the worker once before the measured run and asks for requests
        within 1.1 times ceil(contacts / B)."""
        variant = load_scenario(SCENARIOS / "recurring-ids.toml").variants[0]
        assert (1, 1.1, 0.01) == (
            variant.worker.warm_runs,
            variant.run.requests_goal,
            variant.stream.unknown_share,
        )


class TestPackagedScenarios:
    def test_by_name(self) -> None:
        """A bare name is a packaged scenario; the report names its file in the package."""
        scenario = load_scenario("steady")
        assert scenario.name == "steady"
        assert scenario.path == "worker/bench/scenarios/steady.toml"
        assert [v.label for v in scenario.variants] == ["B=25", "B=50", "B=100", "B=200"]

    def test_the_package_holds_the_scenarios(self) -> None:
        """The packaged folder is the one in the source tree, every scenario listed by name."""
        assert PACKAGED.resolve() == SCENARIOS
        assert packaged_scenarios() == sorted(p.stem for p in SCENARIOS.glob("*.toml"))

    def test_a_path_still_works(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """A file wins over a packaged name: with a suffix, a folder, or found as given."""
        monkeypatch.chdir(tmp_path)
        write(tmp_path, 'description = "mine"\n', "steady")
        assert load_scenario("steady").description == "mine"
        assert load_scenario(tmp_path / "steady").path == str(tmp_path / "steady")
        with pytest.raises(ScenarioError, match="cannot read"):
            load_scenario("sub/steady")

    def test_unknown_name_lists_the_packaged_ones(self) -> None:
        """A name that is neither a file nor packaged says which names there are."""
        with pytest.raises(ScenarioError) as caught:
            load_scenario("stedy")
        assert "no scenario file 'stedy'" in str(caught.value)
        assert "did you mean 'steady'?" in str(caught.value)
        assert "light-load" in str(caught.value)


class TestBadFiles:
    @pytest.mark.parametrize(
        ("text", "message"),
        [
            ("[stream]\nchanges = -1\n", "[stream] changes = -1: must be >= 1"),
            ("[stream]\nchanges = 1.5\n", "changes = 1.5: expected an integer"),
            ('[stream]\ndistribution = "normal"\n', "expected one of 'uniform', 'zipf'"),
            ("[stream]\nunknown_share = 1.0\n", "unknown_share = 1.0: must be >= 0 and < 1"),
            ("[stream]\nchangez = 5\n", "unknown key 'changez' (did you mean 'changes'?)"),
            ('[api]\nlatency = "gauss:3"\n', "bad latency spec 'gauss:3'"),
            ('[api]\nerror_rate = "high"\n', "error_rate = 'high': expected a number"),
            ("[worker]\nbatch_size = 0\n", "[worker] batch_size = 0: must be >= 1"),
            ("[worker]\nrate = inf\n", "must be a finite number"),
            ('[baselines]\nkinds = ["naive"]\n', "unknown baseline 'naive'"),
            ("[baselines]\nmax_changes = { naive = 1 }\n", "unknown baseline 'naive'"),
            ("[baselines]\nmax_changes = { per-change = -1 }\n", "must be >= 0"),
            ("[workers]\nrate = 1\n", "unknown key 'workers' (did you mean 'worker'?)"),
            ("stream = 3\n", "[stream] must be a table"),
            ('[sweep]\nparameter = "batch_size"\nvalues = [1]\n', 'must be "section.key"'),
            ('[sweep]\nparameter = "worker.size"\nvalues = [1]\n', "unknown key 'size'"),
            ('[sweep]\nparameter = "worker.rate"\nvalues = []\n', "values must be a non-empty"),
            ('[sweep]\nparameter = "worker.rate"\nvalues = [1]\nlabels = []\n', "as long as"),
            ('[sweep]\nparameter = "worker.rate"\nvalues = [-1]\n', "sweep rate=-1: [worker]"),
            ("[[variants]]\nworker.rate = 1\n", "variant 1 needs a label"),
            ('[[variants]]\nlabel = "a"\nwork.rate = 1\n', "variant 'a': unknown key 'work'"),
            ('[[variants]]\nlabel = "a"\n[[variants]]\nlabel = "a"\n', "two variants are"),
            ('[[variants]]\nlabel = "a"\nworker.rate = -2\n', "variant 'a': [worker] rate"),
            (
                '[[variants]]\nlabel = "a"\n[sweep]\nparameter = "worker.rate"\nvalues = [1]\n',
                "not both",
            ),
            ("name = 3\n", "name must be a non-empty string"),
            ("[stream\n", "not valid TOML"),
        ],
    )
    def test_message_names_the_problem(self, tmp_path: Path, text: str, message: str) -> None:
        """Each mistake is reported with the file, the key and what was expected."""
        path = write(tmp_path, text)
        with pytest.raises(ScenarioError) as caught:
            load_scenario(path)
        assert message in str(caught.value)
        assert str(path) in str(caught.value)

    def test_missing_file(self, tmp_path: Path) -> None:
        """A file that is not there says so."""
        with pytest.raises(ScenarioError, match="cannot read"):
            load_scenario(tmp_path / "nope.toml")

    def test_parse_without_a_file(self) -> None:
        """parse_scenario takes decoded TOML (e.g. built in code)."""
        scenario = parse_scenario({"worker": {"rate": 3}}, name="inline")
        assert scenario.variants[0].worker.rate == 3
