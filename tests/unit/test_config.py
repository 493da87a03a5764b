"""Settings: flag > environment > default, validation, and the secret's redaction."""

from __future__ import annotations

import argparse

import pytest

from worker.config import OPTIONS, ConfigError, Secret, Settings, add_options, resolve


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_options(parser)
    return parser.parse_args(argv)


REQUIRED = ["--source", "jsonl:in.jsonl", "--client-id", "id", "--client-secret", "s3cr3t"]


class TestPrecedence:
    def test_defaults(self) -> None:
        """Unset options take DESIGN's defaults."""
        settings = resolve(parse(REQUIRED), {})
        assert (100, 200.0, 10.0, 8, 9102) == (
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
