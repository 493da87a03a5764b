"""Settings: flag > environment > file > default, validation, and the secret's redaction."""

from __future__ import annotations

import argparse
import json
import re
import tomllib
from pathlib import Path

import pytest

from worker.config import (
    OPTIONS,
    Origin,
    Secret,
    Settings,
    add_options,
    explain,
)
from worker.config_cli import render_json, render_table
from worker.config_file import check_config, resolution, resolve
from worker.errors import ConfigError


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_options(parser)
    return parser.parse_args(argv)


REQUIRED = ["--source", "jsonl:in.jsonl", "--client-id", "id", "--client-secret", "s3cr3t"]


class TestPrecedence:
    def test_defaults(self) -> None:
        """Unset options take DESIGN's defaults; the rate's is ``auto`` since issue 12 (the
        API's limit is undocumented: docs/rate.md), with a ceiling of 50 requests/s."""
        settings = resolve(parse(REQUIRED), {})
        assert ("auto", 50.0, 300.0) == (
            settings.rate,
            settings.max_rate,
            settings.max_retry_after_s,
        )
        assert (100, 200.0, "auto", 8, 9102) == (
            settings.batch_size,
            settings.linger_ms,
            settings.rate,
            settings.concurrency,
            settings.http_port,
        )
        assert "jsonl:dead-letters.jsonl" == settings.dlq
        assert "https://api.smsgatewayapi.com" == settings.api_url

    def test_environment_over_default(self) -> None:
        """An environment variable replaces the default."""
        settings = resolve(parse(REQUIRED), {"WORKER_BATCH_SIZE": "50", "WORKER_FOLLOW": "true"})
        assert (50, True) == (settings.batch_size, settings.follow)

    def test_flag_over_environment(self) -> None:
        """A flag wins over its environment variable."""
        args = parse([*REQUIRED, "--batch-size", "20", "--follow"])
        settings = resolve(args, {"WORKER_BATCH_SIZE": "50", "WORKER_FOLLOW": "false"})
        assert (20, True) == (settings.batch_size, settings.follow)

    def test_required_from_environment(self) -> None:
        """Required settings may come from the environment alone."""
        env = {"WORKER_SOURCE": "jsonl:-", "SMSGW_CLIENT_ID": "i", "SMSGW_CLIENT_SECRET": "s"}
        settings = resolve(parse([]), env)
        assert ("jsonl:-", "i", Secret("s")) == (
            settings.source,
            settings.client_id,
            settings.client_secret,
        )

    def test_every_option_has_its_own_flag_and_variable(self) -> None:
        """No two options share a flag or an environment variable."""
        assert len(OPTIONS) == len({o.flag for o in OPTIONS}) == len({o.env for o in OPTIONS})


class TestValidation:
    @pytest.mark.parametrize(
        ("argv", "env", "fragment"),
        [
            ([], {}, "--source (or WORKER_SOURCE) is required"),
            (["--batch-size", "0"], {}, "--batch-size: must be at least 1"),
            (["--concurrency", "x"], {}, "--concurrency: not a number"),
            ([], {"WORKER_RATE": "-1"}, "WORKER_RATE: must be 0 or more"),
            ([], {"WORKER_LINGER_MS": "nan"}, "WORKER_LINGER_MS: not a finite number"),
            (["--http-port", "70000"], {}, "--http-port: must be a port number"),
            (["--api-url", "api.example"], {}, "--api-url: must be an http:// or https:// URL"),
            ([], {"WORKER_FOLLOW": "maybe"}, "WORKER_FOLLOW: must be true or false"),
            (["--log-format", "xml"], {}, "--log-format: must be one of"),
        ],
    )
    def test_invalid_values_named(
        self, argv: list[str], env: dict[str, str], fragment: str
    ) -> None:
        """Every invalid value is reported with the flag or variable it came from."""
        base = [] if fragment.startswith("--source") else REQUIRED
        with pytest.raises(ConfigError, match=None) as caught:
            resolve(parse([*base, *argv]), env)
        assert fragment in str(caught.value)

    def test_all_problems_reported_at_once(self) -> None:
        """Several bad settings are all named in one error."""
        with pytest.raises(ConfigError) as caught:
            resolve(parse(["--batch-size", "0", "--rate", "x"]), {})
        message = str(caught.value)
        assert all(part in message for part in ("--source", "--batch-size", "--rate"))

    def test_checkpoint_needs_a_file_source(self) -> None:
        """stdin cannot be checkpointed or followed."""
        with pytest.raises(ConfigError, match="stdin"):
            resolve(parse([*REQUIRED[2:], "--source", "jsonl:-", "--checkpoint", "cp"]), {})


class TestSecret:
    def test_secret_never_shows(self) -> None:
        """The secret appears in no repr or str of the settings."""
        settings = resolve(parse(REQUIRED), {})
        assert "s3cr3t" not in repr(settings) + str(settings) + str(settings.client_secret)
        assert "s3cr3t" == settings.client_secret.reveal()

    def test_settings_repr_of_a_constructed_instance(self) -> None:
        """Even a hand-built Settings hides the secret."""
        settings = Settings(source="jsonl:-", client_id="i", client_secret=Secret("hunter2"))
        assert "hunter2" not in repr(settings)


class TestDeadLetterDefault:
    @pytest.mark.parametrize(
        ("source", "dlq"),
        [
            ("jsonl:in.jsonl", "jsonl:dead-letters.jsonl"),
            ("postgresql://u@127.0.0.1/test", "postgresql://u@127.0.0.1/test"),
            ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ],
    )
    def test_dead_letters_stay_in_the_inputs_store(self, source: str, dlq: str) -> None:
        """Without --dlq, a store input keeps its dead letters; a file input writes a file."""
        settings = resolve(parse([*REQUIRED[2:], "--source", source]), {})
        assert dlq == settings.dlq

    def test_explicit_dlq_wins(self) -> None:
        """--dlq overrides the default for any input."""
        argv = [*REQUIRED[2:], "--source", "postgresql://x/y", "--dlq", "jsonl:d.jsonl"]
        assert "jsonl:d.jsonl" == resolve(parse(argv), {}).dlq


class TestRedactUri:
    def test_password_hidden(self) -> None:
        """A password in a URI never reaches the logs."""
        from worker.config import redact_uri

        assert "postgresql://u:***@db:5432/x?table=t" == redact_uri(
            "postgresql://u:hunter2@db:5432/x?table=t"
        )
        assert "redis://127.0.0.1:6379/0" == redact_uri("redis://127.0.0.1:6379/0")
        assert "jsonl:in.jsonl" == redact_uri("jsonl:in.jsonl")


# -- the configuration file: a layer under flags and environment, over defaults --


def toml_file(tmp_path: Path, text: str, name: str = "worker.toml") -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


CREDENTIALS = 'source = "jsonl:in.jsonl"\nclient_id = "id"\nclient_secret = "s3cr3t"\n'


class TestFileLayer:
    def test_four_layers(self, tmp_path: Path) -> None:
        """Flag over environment over file over default, each setting on its own."""
        path = toml_file(tmp_path, f"{CREDENTIALS}batch_size = 7\nrate = 3\nconcurrency = 5\n")
        args = parse(["--config", path, "--batch-size", "9"])
        env = {"WORKER_BATCH_SIZE": "8", "WORKER_RATE": "4"}
        settings = resolve(args, env)
        assert (9, 4.0, 5, 200.0) == (
            settings.batch_size,  # flag, though the environment and the file give it too
            settings.rate,  # environment, though the file gives it too
            settings.concurrency,  # file
            settings.linger_ms,  # default
        )

    def test_origins_named(self, tmp_path: Path) -> None:
        """Each setting says which layer it came from, and where."""
        path = toml_file(tmp_path, f"{CREDENTIALS}batch_size = 7\nrate = 3\n")
        args = parse(["--config", path, "--batch-size", "9"])
        result = resolution(args, {"WORKER_RATE": "4", "WORKER_CONFIG": "ignored.toml"})
        origins = {c.option.field: c.describe() for c in result.choices}
        assert {
            "batch_size": "flag --batch-size",
            "rate": "env WORKER_RATE",
            "source": f"file {path}",
            "linger_ms": "default",
            "dlq": "default",
        }.items() <= origins.items()
        assert path == result.config_file

    def test_file_named_by_the_environment(self, tmp_path: Path) -> None:
        """WORKER_CONFIG names the file when --config is not given."""
        path = toml_file(tmp_path, f"{CREDENTIALS}batch_size = 7\n")
        assert 7 == resolve(parse([]), {"WORKER_CONFIG": path}).batch_size

    def test_no_file_no_layer(self) -> None:
        """Without --config or WORKER_CONFIG nothing is read and no origin is a file."""
        result = resolution(parse(REQUIRED), {})
        assert None is result.config_file
        assert Origin.FILE not in {c.origin for c in result.choices}

    def test_typed_and_text_values_alike(self, tmp_path: Path) -> None:
        """TOML integers, floats and booleans, or strings the flags' parsers read, all work."""
        text = (
            f'{CREDENTIALS}batch_size = "10"\nlinger_ms = 5\nrate = 2.5\nfollow = true\n'
            'http_port = "0"\nlog_level = "debug"\nmax_retries = 3\n'
        )
        settings = resolve(parse(["--config", toml_file(tmp_path, text)]), {})
        assert (10, 5.0, 2.5, True, 0, "debug", 3) == (
            settings.batch_size,
            settings.linger_ms,
            settings.rate,
            settings.follow,
            settings.http_port,
            settings.log_level,
            settings.max_retries,
        )

    def test_every_default_written_back_reads_the_same(self) -> None:
        """A file holding each option's default as a TOML value resolves to the defaults:
        every option's type is accepted in a file, new options included."""
        data = {o.field: o.default for o in OPTIONS if o.default is not None}
        data.update(source="jsonl:in.jsonl", client_id="id", client_secret="s3cr3t")
        result = explain(parse([]), {}, check_config(data, "f.toml"))
        assert {Origin.FILE} == {c.origin for c in result.choices if c.option.field in data}
        assert resolve(parse(REQUIRED), {}) == result.settings()

    def test_secret_from_the_file_stays_hidden(self, tmp_path: Path) -> None:
        """A secret read from a file is as hidden as one from the environment."""
        settings = resolve(parse(["--config", toml_file(tmp_path, CREDENTIALS)]), {})
        assert "s3cr3t" == settings.client_secret.reveal()
        assert "s3cr3t" not in repr(settings)

    def test_switch_from_the_file_turned_off_by_the_environment(self, tmp_path: Path) -> None:
        """`follow = true` in the file yields to WORKER_FOLLOW=false."""
        path = toml_file(tmp_path, f"{CREDENTIALS}follow = true\n")
        assert not resolve(parse(["--config", path]), {"WORKER_FOLLOW": "false"}).follow

    def test_derived_dead_letters_from_a_file_source(self, tmp_path: Path) -> None:
        """A store source from the file keeps its dead letters there, shown as derived."""
        text = 'source = "redis://127.0.0.1:6379/0"\nclient_id = "i"\nclient_secret = "s"\n'
        result = resolution(parse(["--config", toml_file(tmp_path, text)]), {})
        dlq = next(c for c in result.choices if c.option.field == "dlq")
        assert ("redis://127.0.0.1:6379/0", Origin.DERIVED, "default: from source") == (
            dlq.value,
            dlq.origin,
            dlq.describe(),
        )


class TestFileErrors:
    def error(self, tmp_path: Path, text: str, env: dict[str, str] | None = None) -> str:
        path = toml_file(tmp_path, text)
        with pytest.raises(ConfigError) as caught:
            resolve(parse(["--config", path]), env or {})
        return str(caught.value).replace(path, "FILE")

    @pytest.mark.parametrize(
        ("text", "message"),
        [
            ("batchsize = 1\n", "FILE: unknown key 'batchsize' (did you mean 'batch_size'?)"),
            ("batch-size = 1\n", "FILE: unknown key 'batch-size' (did you mean 'batch_size'?)"),
            (
                "request-timeout = 1\n",
                "FILE: unknown key 'request-timeout' (did you mean 'request_timeout_s'?)",
            ),
            (
                "WORKER_MAX_WAITING = 1\n",
                "FILE: unknown key 'WORKER_MAX_WAITING' (did you mean 'max_waiting'?)",
            ),
            ("colour = 'red'\n", "FILE: unknown key 'colour'"),
            ("[run]\nbatch_size = 1\n", "FILE: unknown table 'run'"),
        ],
    )
    def test_unknown_keys_suggest_the_closest(
        self, tmp_path: Path, text: str, message: str
    ) -> None:
        """An unknown key is named with the known key meant: flag and variable names too."""
        assert message == self.error(tmp_path, CREDENTIALS + text)

    @pytest.mark.parametrize(
        ("text", "message"),
        [
            (
                "batch_size = true",
                "FILE: batch_size: expected an integer (or a string), got a boolean",
            ),
            (
                "batch_size = 1.5",
                "FILE: batch_size: expected an integer (or a string), got a float",
            ),
            ("rate = false", "FILE: rate: expected a number (or a string), got a boolean"),
            ("follow = 1", "FILE: follow: expected a boolean (or a string), got an integer"),
            ("client_id = 12345", "FILE: client_id: expected a string, got an integer (quote it)"),
            ("api_url = ['x']", "FILE: api_url: expected a string, got an array"),
            ("checkpoint = 2026-01-01", "FILE: checkpoint: expected a string, got a date/time"),
        ],
    )
    def test_wrong_types(self, tmp_path: Path, text: str, message: str) -> None:
        """A TOML value of a type the setting does not hold names the file, key and types."""
        base = CREDENTIALS.replace('client_id = "id"\n', "")
        assert message in self.error(tmp_path, f"{base}{text}\n")

    @pytest.mark.parametrize(
        ("text", "message"),
        [
            ("batch_size = 0", "FILE: batch_size: must be at least 1, got 0"),
            ("rate = 'fast'", "FILE: rate: not a number: 'fast'"),
            ("rate = inf", "FILE: rate: not a finite number: 'inf'"),
            ("http_port = 70000", "FILE: http_port: must be a port number 0-65535"),
            ("log_format = 'xml'", "FILE: log_format: must be one of auto, json, console"),
            ("follow = 'maybe'", "FILE: follow: must be true or false"),
        ],
    )
    def test_invalid_values_name_file_and_key(
        self, tmp_path: Path, text: str, message: str
    ) -> None:
        """The flags' parsers validate the file's values; the error names the file and key."""
        assert message in self.error(tmp_path, f"{CREDENTIALS}{text}\n")

    def test_overridden_value_not_judged(self, tmp_path: Path) -> None:
        """Like an overridden variable, a file value a flag replaces is not parsed."""
        path = toml_file(tmp_path, f"{CREDENTIALS}batch_size = '0'\n")
        assert 5 == resolve(parse(["--config", path, "--batch-size", "5"]), {}).batch_size

    def test_all_problems_at_once(self, tmp_path: Path) -> None:
        """Bad keys come together; bad values come together with those of flags and env."""
        assert "'colur'" in self.error(tmp_path, "colur = 1\nbatch-size = 2\n")
        message = self.error(tmp_path, "batch_size = 0\nrate = -1\n", {"WORKER_LINGER_MS": "x"})
        for part in ("FILE: batch_size", "FILE: rate", "WORKER_LINGER_MS", "--source"):
            assert part in message

    def test_required_names_the_file_key(self, tmp_path: Path) -> None:
        """A missing required setting says it may also be given in the file."""
        message = self.error(tmp_path, 'client_id = "i"\nclient_secret = "s"\n')
        assert "--source (or WORKER_SOURCE, or source in FILE) is required" == message

    def test_bad_toml_says_where(self, tmp_path: Path) -> None:
        """A syntax error names the file, line and column."""
        message = self.error(tmp_path, 'source = "jsonl:-"\nbatch_size = \n')
        assert "FILE: not valid TOML: Invalid value (at line 2, column 14)" == message

    def test_missing_file(self, tmp_path: Path) -> None:
        """A named file that is not there stops the run: no silent defaults."""
        path = str(tmp_path / "absent.toml")
        with pytest.raises(ConfigError, match="absent.toml: configuration file not found"):
            resolve(parse(["--config", path]), {})

    def test_unreadable_file(self, tmp_path: Path) -> None:
        """A directory or non-UTF-8 bytes are named, not a traceback."""
        with pytest.raises(ConfigError, match="cannot read"):
            resolve(parse(["--config", str(tmp_path)]), {})
        (tmp_path / "latin1.toml").write_bytes(b'client_id = "caf\xe9"\n')
        with pytest.raises(ConfigError, match="latin1.toml: not UTF-8"):
            resolve(parse(["--config", str(tmp_path / "latin1.toml")]), {})

    def test_empty_config_variable(self) -> None:
        """WORKER_CONFIG set but empty is an error, like any empty setting."""
        with pytest.raises(ConfigError, match="WORKER_CONFIG: must not be empty"):
            resolve(parse(REQUIRED), {"WORKER_CONFIG": ""})

    def test_type_error_never_shows_a_secret(self, tmp_path: Path) -> None:
        """A secret of the wrong type is reported without its value."""
        text = 'source = "jsonl:-"\nclient_id = "i"\nclient_secret = 987654321\n'
        message = self.error(tmp_path, text)
        assert "client_secret: expected a string" in message
        assert "987654321" not in message


class TestShow:
    def test_values_as_shown(self) -> None:
        """`config` masks secrets, redacts URI passwords and marks what is missing."""
        env = {
            "WORKER_SOURCE": "postgresql://u:hunter2@db/x",
            "SMSGW_CLIENT_SECRET": "s3cr3t",
            "WORKER_RATE": "2.5",
        }
        result = explain(parse([]), env)
        table = render_table(result)
        assert "hunter2" not in table and "s3cr3t" not in table
        rows = {line.split()[0]: line.split()[1:] for line in table.splitlines()}
        assert ["postgresql://u:***@db/x", "env", "WORKER_SOURCE"] == rows["source"]
        assert ["postgresql://u:***@db/x", "default:", "from", "source"] == rows["dlq"]
        assert ["***", "env", "SMSGW_CLIENT_SECRET"] == rows["client_secret"]
        assert ["(required,", "missing)", "missing"] == rows["client_id"]
        assert ["2.5", "env", "WORKER_RATE"] == rows["rate"]
        assert ["200", "default"] == rows["linger_ms"]

    def test_json(self) -> None:
        """`config --json` gives each setting's value, origin, place and problem."""
        env = {"WORKER_SOURCE": "jsonl:-", "SMSGW_CLIENT_ID": "i", "SMSGW_CLIENT_SECRET": "s3cr3t"}
        data = json.loads(render_json(explain(parse(["--batch-size", "0"]), env)))
        assert {
            "value": "***",
            "origin": "env",
            "where": "SMSGW_CLIENT_SECRET",
            "problem": None,
        } == (data["settings"]["client_secret"])
        assert {
            "value": None,
            "origin": "flag",
            "where": "--batch-size",
            "problem": "must be at least 1, got 0",
        } == data["settings"]["batch_size"]
        assert ["--batch-size: must be at least 1, got 0"] == data["problems"]
        assert None is data["config_file"]


def test_readme_sample_file_is_valid() -> None:
    """The sample file of docs/operations.md, "Configuration file", resolves without a problem."""
    readme = (Path(__file__).parents[2] / "docs" / "operations.md").read_text()
    section = readme.split("## Configuration file", 1)[1]
    sample = section.split("```toml\n", 1)[1].split("```", 1)[0]
    file = check_config(tomllib.loads(sample), "worker.toml")
    settings = explain(parse([]), {"SMSGW_CLIENT_SECRET": "s"}, file).settings()
    assert (200, "json") == (settings.batch_size, settings.log_format)


class TestRunHelp:
    @staticmethod
    def help_text(capsys: pytest.CaptureFixture[str]) -> str:
        """`contact-worker run --help`, its lines unwrapped."""
        from worker.cli import main

        with pytest.raises(SystemExit):
            main(["run", "--help"])
        return " ".join(capsys.readouterr().out.split())

    def test_source_names_every_input(self, capsys: pytest.CaptureFixture[str]) -> None:
        """The help of --source names every input `run` reads, not only jsonl:."""
        text = self.help_text(capsys)
        source = text[text.index("--source URI where") : text.index("--dlq URI where")]
        for scheme in ("jsonl:PATH", "jsonl:- (stdin)", "sqlite:PATH", "postgresql://", "redis://"):
            assert scheme in source, source

    def test_each_value_is_named_for_what_it_is(self, capsys: pytest.CaptureFixture[str]) -> None:
        """Metavars say what a value is (``--http-port PORT``), never a piece of the option's
        name (``--client-secret CLIENT``, ``--http-port HTTP``)."""
        text = self.help_text(capsys)
        for shown in (
            "--source URI",
            "--api-url URL",
            "--client-secret SECRET",
            "--http-port PORT",
            "--concurrency N",
            "--linger-ms MS",
            "--drain-timeout SECONDS",
            "--ingest-token TOKEN",
        ):
            assert shown in text
        for option in OPTIONS:
            assert f"{option.flag} {option.flag[2:].split('-')[0].upper()} " not in text, option


class TestRateOptions:
    """``--rate auto``, ``--max-rate``, ``--max-retry-after`` (issue 12)."""

    @pytest.mark.parametrize(
        ("text", "value"), [("auto", "auto"), ("AUTO", "auto"), ("12.5", 12.5), ("0", 0.0)]
    )
    def test_rate_takes_auto_or_a_number(self, text: str, value: object) -> None:
        """``auto`` in any case, or a number of requests/s (0: no limit)."""
        assert value == resolve(parse([*REQUIRED, "--rate", text]), {}).rate

    @pytest.mark.parametrize(
        ("argv", "message"),
        [
            (["--rate", "fast"], "--rate: not a number: 'fast' (or auto)"),
            (["--rate", "-1"], "--rate: must be 0 or more, got -1 (or auto)"),
            (["--max-rate", "0"], "--max-rate: must be more than 0"),
            (["--max-retry-after", "-5"], "--max-retry-after: must be more than 0"),
        ],
    )
    def test_bad_values_name_the_flag(self, argv: list[str], message: str) -> None:
        """A bad value stops the command with the flag's name and what is wrong."""
        with pytest.raises(ConfigError, match=re.escape(message)):
            resolve(parse([*REQUIRED, *argv]), {})

    def test_environment(self) -> None:
        """WORKER_RATE=auto, WORKER_MAX_RATE and WORKER_MAX_RETRY_AFTER read like the flags."""
        env = {"WORKER_RATE": "auto", "WORKER_MAX_RATE": "80", "WORKER_MAX_RETRY_AFTER": "60"}
        settings = resolve(parse(REQUIRED), env)
        assert ("auto", 80.0, 60.0) == (
            settings.rate,
            settings.max_rate,
            settings.max_retry_after_s,
        )
