"""The ``kafka://`` URI and a partition's commit bookkeeping, without a broker."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from worker.backends.kafka.progress import PartitionProgress
from worker.backends.kafka.uri import parse_uri
from worker.config import redact_uri
from worker.errors import ConfigError


class TestUri:
    def test_defaults(self) -> None:
        """One broker and a topic: the group, partitions and dead-letter topic defaults."""
        address = parse_uri("kafka://k1:9092/contacts")
        assert (("k1:9092",), "contacts", "contact-worker", 1) == (
            address.brokers,
            address.topic,
            address.group,
            address.partitions,
        )
        assert "contacts.dead-letters" == address.dead_letter_topic
        assert "PLAINTEXT" == address.client_options()["security_protocol"]

    def test_several_brokers_and_options(self) -> None:
        """Brokers separated by commas (port 9092 when left out); every option read."""
        address = parse_uri(
            "kafka://k1:9093,k2,k3:9095/crm.contacts?group=sync&partitions=12&window=500"
            "&dead_topic=dead&poll_s=0.5&batch=200&session_timeout_s=6&replication=3"
        )
        assert ("k1:9093", "k2:9092", "k3:9095") == address.brokers
        assert ("sync", 12, 500, "dead", 0.5, 200, 6.0, 3) == (
            address.group,
            address.partitions,
            address.window,
            address.dead_letter_topic,
            address.poll_s,
            address.batch,
            address.session_timeout_s,
            address.replication,
        )

    def test_sasl_password_never_shown(self) -> None:
        """A user and password in the URI mean SASL (PLAIN unless told); the password is in
        neither the display form nor the redacted URI."""
        uri = "kafka://app:p%40ss@k1:9093/contacts?sasl_mechanism=scram-sha-512&tls=1"
        address = parse_uri(uri)
        options = address.client_options()
        assert ("SASL_SSL", "SCRAM-SHA-512", "app", "p@ss") == (
            options["security_protocol"],
            options["sasl_mechanism"],
            options["sasl_plain_username"],
            options["sasl_plain_password"],
        )
        assert "p%40ss" not in redact_uri(uri) and "ss" not in address.display
        assert "PLAIN" == parse_uri("kafka://a:b@k1/t").sasl_mechanism

    @pytest.mark.parametrize(
        ("uri", "message"),
        [
            ("kafka:///t", "at least one broker"),
            ("kafka://k1:9092/", "one topic"),
            ("kafka://k1:99999/t", "bad port"),
            ("kafka://k1/t?partitions=0", "partitions must be at least 1"),
            ("kafka://k1/t?sasl_mechanism=GSSAPI", "sasl_mechanism must be one of"),
            ("kafka://k1/t?sasl_mechanism=PLAIN", "needs a user and password"),
            ("kafka://k1/t?stream=x", "unknown parameter 'stream'"),
            ("kafka://k1/t?ssl_keyfile=k.pem", "ssl_keyfile needs ssl_certfile"),
        ],
    )
    def test_bad_uris_are_refused_clearly(self, uri: str, message: str) -> None:
        """Each mistake is a ConfigError naming it."""
        with pytest.raises(ConfigError, match=message):
            parse_uri(uri)


class TestProgress:
    @given(st.integers(1, 60), st.data())
    def test_commit_point_is_the_first_record_not_done(self, n: int, data: st.DataObject) -> None:
        """Whatever records are done, in whatever order, the commit point is the first offset
        not done (or the one after the last handed out): never past an unacknowledged one."""
        start = data.draw(st.integers(0, 1000))
        offsets = [start + i for i in range(n)]
        progress = PartitionProgress(window=10_000)
        for offset in offsets:
            progress.handed(offset, str(offset % 7))
        done = data.draw(st.lists(st.sampled_from(offsets), unique=True))
        for offset in done:
            assert progress.done(offset)
        left = [offset for offset in offsets if offset not in done]
        assert (left[0] if left else start + n) == progress.commit_point()
        assert len(left) == progress.unacked
        assert {str(o % 7) for o in left} == progress.keys()
        assert not progress.done(start + n)  # never handed out

    def test_window_counts_from_the_last_commit(self) -> None:
        """Records go out up to ``window`` past the last committed offset, and further once a
        commit moved it."""
        progress = PartitionProgress(window=3)
        assert progress.room(10)
        progress.handed(10, "a")
        assert (progress.room(12), progress.room(13)) == (True, False)
        progress.done(10)
        assert 11 == progress.to_commit()
        progress.committed = 11
        assert progress.room(13) and not progress.room(14)
        assert progress.to_commit() is None
