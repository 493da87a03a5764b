"""The configuration file as a user meets it: `contact-worker config` and `run --config`."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

from tests.cli.test_cli import BIN, SECRET, Gateway, gateway, run, summary, worker_env
from tests.engine.harness import expected_state, write_lines
from tests.engine.test_engine import stream

__all__ = ["gateway"]  # the fixture, shared with test_cli

PASSWORD = "pg-pa55word"


def clean_env(**extra: str) -> dict[str, str]:
    """The caller's environment without any setting of the worker, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WORKER_", "SMSGW_"))}
    env.update(extra)
    return env


def config(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [BIN, "config", *args], env=env, capture_output=True, text=True, timeout=60
    )


def rows(stdout: str) -> dict[str, list[str]]:
    """The table of `config` by setting: [value, from...]."""
    return {line.split()[0]: line.split()[1:] for line in stdout.splitlines()[1:]}


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "worker.toml"
    path.write_text(text, encoding="utf-8")
    return path


class TestConfigCommand:
    def test_shows_value_and_origin_of_every_setting(self, tmp_path: Path) -> None:
        """Each setting is shown with the layer it came from; the secret and the password in
        the source URI appear nowhere in the output."""
        path = write_config(
            tmp_path,
            f'source = "postgresql://app:{PASSWORD}@127.0.0.1/test"\n'
            f'client_secret = "{SECRET}"\nbatch_size = 250\nrate = 4\n',
        )
        env = clean_env(SMSGW_CLIENT_ID="acme", WORKER_RATE="6")
        result = config(["--config", str(path), "--concurrency", "3"], env)
        assert 0 == result.returncode, result.stderr
        assert f"configuration file: {path}" == result.stdout.splitlines()[0]
        table = rows(result.stdout)
        assert ["postgresql://app:***@127.0.0.1/test", "file", str(path)] == table["source"]
        assert ["postgresql://app:***@127.0.0.1/test", "default:", "from", "source"] == table["dlq"]
        assert ["***", "file", str(path)] == table["client_secret"]
        assert ["acme", "env", "SMSGW_CLIENT_ID"] == table["client_id"]
        assert ["250", "file", str(path)] == table["batch_size"]
        assert ["6", "env", "WORKER_RATE"] == table["rate"]
        assert ["3", "flag", "--concurrency"] == table["concurrency"]
        assert ["200", "default"] == table["linger_ms"]
        for hidden in (SECRET, PASSWORD):
            assert hidden not in result.stdout + result.stderr

    def test_json(self, tmp_path: Path) -> None:
        """`--json` gives the same as data, for scripts."""
        path = write_config(tmp_path, f'client_secret = "{SECRET}"\nfollow = true\n')
        env = clean_env(WORKER_SOURCE="jsonl:in.jsonl", SMSGW_CLIENT_ID="acme")
        result = config(["--json"], {**env, "WORKER_CONFIG": str(path)})
        assert 0 == result.returncode, result.stderr
        data: dict[str, Any] = json.loads(result.stdout)
        settings = data["settings"]
        assert str(path) == data["config_file"]
        assert [] == data["problems"]
        assert {"value": True, "origin": "file", "where": str(path), "problem": None} == (
            settings["follow"]
        )
        assert ("***", "file") == (
            settings["client_secret"]["value"],
            settings["client_secret"]["origin"],
        )
        assert ("jsonl:dead-letters.jsonl", "default") == (
            settings["dlq"]["value"],
            settings["dlq"]["origin"],
        )
        assert SECRET not in result.stdout + result.stderr

    def test_missing_required_printed_and_exit_2(self) -> None:
        """Required settings given nowhere are marked in the table; the exit code is 2 and
        stderr says what `run` would say."""
        result = config([], clean_env(SMSGW_CLIENT_SECRET=SECRET))
        assert 2 == result.returncode
        table = rows(result.stdout)
        assert ["(required,", "missing)", "missing"] == table["source"]
        assert ["***", "env", "SMSGW_CLIENT_SECRET"] == table["client_secret"]
        assert result.stderr.startswith(
            "contact-worker: --source (or WORKER_SOURCE) is required; "
            "--client-id (or SMSGW_CLIENT_ID) is required"
        )
        assert SECRET not in result.stdout + result.stderr

    def test_invalid_value_marked_and_exit_2(self, tmp_path: Path) -> None:
        """A bad value in the file is marked invalid; stderr names the file and the key."""
        path = write_config(tmp_path, "batch_size = 0\n")
        result = config(["--config", str(path), "--source", "jsonl:-"], clean_env())
        assert 2 == result.returncode
        assert ["(invalid)", "file", str(path)] == rows(result.stdout)["batch_size"]
        assert f"{path}: batch_size: must be at least 1, got 0" in result.stderr

    def test_an_input_run_would_refuse_exits_2(self) -> None:
        """The input's URI is parsed as `run` parses it (not connected): a bad one is an
        error here too, its password not shown."""
        env = clean_env(SMSGW_CLIENT_ID="demo", SMSGW_CLIENT_SECRET=SECRET)
        result = config(["--source", "redis://:hunter2@127.0.0.1:99999/0"], env)
        assert 2 == result.returncode
        assert "bad port" in result.stderr
        assert "hunter2" not in result.stdout + result.stderr
        assert 0 == config(["--source", "redis://127.0.0.1:6379/0"], env).returncode

    def test_an_old_uri_option_warns_on_stderr_and_works(self) -> None:
        """An option renamed in this release (``count``, now ``batch``) still works, with a
        warning log event on stderr; stdout stays the JSON document."""
        env = clean_env(SMSGW_CLIENT_ID="demo", SMSGW_CLIENT_SECRET=SECRET)
        result = config(["--json", "--source", "redis://127.0.0.1:6379/0?count=5"], env)
        assert 0 == result.returncode, result.stderr
        assert (
            "redis://127.0.0.1:6379/0?count=5"
            == json.loads(result.stdout)["settings"]["source"]["value"]
        )
        events = [json.loads(line) for line in result.stderr.splitlines()]
        assert {("config.deprecated_uri_key", "count", "batch")} == {
            (event["event"], event["old"], event["new"]) for event in events
        }

    def test_an_unknown_uri_option_exits_2_naming_it(self) -> None:
        """A misspelt option is refused (exit 2), naming it and the options the input knows."""
        env = clean_env(SMSGW_CLIENT_ID="demo", SMSGW_CLIENT_SECRET=SECRET)
        result = config(["--source", "sqlite:spool.db?batchsize=5"], env)
        assert 2 == result.returncode
        assert result.stderr.startswith(
            "contact-worker: sqlite URI: unknown parameter 'batchsize' (known: batch, "
        )

    def test_unknown_key_stops_before_the_table(self, tmp_path: Path) -> None:
        """A file with an unknown key is refused whole, with the key it probably meant."""
        path = write_config(tmp_path, "batch-size = 10\n")
        result = config(["--config", str(path)], clean_env())
        assert 2 == result.returncode
        assert "" == result.stdout
        assert (
            f"contact-worker: {path}: unknown key 'batch-size' (did you mean 'batch_size'?)\n"
            == result.stderr
        )


class TestRunWithConfigFile:
    def test_run_takes_source_batch_size_and_secret_from_the_file(
        self, gateway: Gateway, tmp_path: Path
    ) -> None:
        """`run --config FILE` reads the source, batch size and secret from the file: the input
        drains, exit 0, no request carries more than the file's batch size."""
        changes = stream(300, 60, seed=5)
        write_lines(tmp_path / "in.jsonl", changes)
        path = write_config(
            tmp_path,
            f'source = "jsonl:{tmp_path / "in.jsonl"}"\nbatch_size = 7\n'
            f'client_secret = "{SECRET}"\nlog_format = "json"\n',
        )
        env = worker_env(gateway, tmp_path)
        del env["SMSGW_CLIENT_SECRET"]
        result = run(["--config", str(path)], env)
        assert 0 == result.returncode, result.stderr
        assert expected_state(changes) == gateway.get("/_sim/contacts")
        stats = gateway.get("/_sim/stats")
        assert 1 <= stats["max_ids_per_request"] <= 7
        assert stats["requests"] >= 60 / 7
        done = summary(result.stderr)
        assert ("drained", 300) == (done["ending"], done["acked"])
        assert SECRET not in result.stdout + result.stderr

    def test_run_refuses_a_bad_file_before_any_request(
        self, gateway: Gateway, tmp_path: Path
    ) -> None:
        """An invalid value in the file: exit 2 naming file and key; the API sees nothing."""
        write_lines(tmp_path / "in.jsonl", stream(10, 10))
        path = write_config(
            tmp_path, f'source = "jsonl:{tmp_path / "in.jsonl"}"\nconcurrency = true\n'
        )
        result = run(["--config", str(path)], worker_env(gateway, tmp_path))
        assert 2 == result.returncode
        assert (
            f"contact-worker: {path}: concurrency: expected an integer (or a string), "
            "got a boolean\n" == result.stderr
        )
        assert 0 == gateway.get("/_sim/stats")["requests"]
