"""Decoding and validation of one change (DESIGN "Formats")."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.core.change import (
    FIELDS,
    TEXT_FIELDS,
    Change,
    Invalid,
    decode,
    decode_all,
    key_mismatch,
    key_of,
    validate,
)


def invalid(line: bytes) -> Invalid:
    """Decode ``line``, which must be refused."""
    result = decode(line, "in.jsonl:1")
    assert isinstance(result, Invalid)
    return result


def refused(obj: Any) -> str:
    """The reason the JSON form of ``obj`` is refused."""
    return invalid(orjson.dumps(obj)).reason


class TestDecodeBadRecord:
    """Records that are not even a JSON object keep what is needed to dead-letter them."""

    def test_bad_json_keeps_the_raw_text(self) -> None:
        """Text that is not JSON is refused as such; the raw text is kept, there is no change."""
        result = invalid(b'{"ID": 1, "lastname": ')
        assert result.reason.startswith("not valid JSON: ")
        assert '{"ID": 1, "lastname": ' == result.raw
        assert None is result.change
        assert "in.jsonl:1" == result.token

    def test_invalid_utf8_keeps_a_readable_raw_text(self) -> None:
        """Bytes that are not UTF-8 are refused; the raw text is kept with replacement marks."""
        result = invalid(b'{"ID": 1, "lastname": "\xff"}')
        assert result.reason.startswith("not valid JSON: ")
        assert '{"ID": 1, "lastname": "\ufffd"}' == result.raw

    def test_empty_line_is_not_json(self) -> None:
        """An empty record is not valid JSON."""
        result = invalid(b"")
        assert result.reason.startswith("not valid JSON: ")
        assert "" == result.raw

    @pytest.mark.parametrize(
        ("line", "described"),
        [
            (b"[1, 2]", "an array ([1,2])"),
            (b'"ID"', 'a string ("ID")'),
            (b"42", "a number (42)"),
            (b"null", "null"),
            (b"true", "a boolean (true)"),
        ],
    )
    def test_not_an_object(self, line: bytes, described: str) -> None:
        """JSON that is not an object is refused naming what it is; the raw text is kept."""
        result = invalid(line)
        assert f"a change must be a JSON object, got {described}" == result.reason
        assert line.decode() == result.raw
        assert None is result.change

    def test_an_object_is_kept_as_the_change(self) -> None:
        """A refused object is kept as the change (not as raw text) for the dead letter."""
        result = invalid(b'{"ID": 1, "nickname": "Bo"}')
        assert {"ID": 1, "nickname": "Bo"} == result.change
        assert None is result.raw


class TestValidateId:
    """``ID`` must be there and be a non-empty string or an integer."""

    def test_missing_id(self) -> None:
        """An object without ID is refused as such."""
        assert "missing ID" == refused({"lastname": "Lee"})

    @pytest.mark.parametrize(
        ("value", "described"),
        [
            (True, "a boolean (true)"),
            (False, "a boolean (false)"),
            (1.0, "a number (1.0)"),
            (12.5, "a number (12.5)"),
            (None, "null"),
            ("", 'a string ("")'),
            ([1], "an array ([1])"),
            ({"id": 1}, 'an object ({"id":1})'),
        ],
    )
    def test_unusable_id(self, value: Any, described: str) -> None:
        """An ID of any other type (or an empty string) is refused, naming what it was."""
        expected = f"ID must be a non-empty string or an integer, got {described}"
        assert expected == refused({"ID": value, "lastname": "Lee"})

    def test_only_id(self) -> None:
        """A change must change something besides ID."""
        assert "no field to change besides ID" == refused({"ID": 7})

    @pytest.mark.parametrize(
        ("value", "key"), [(7, "7"), (-3, "-3"), (0, "0"), ("7", "7"), ("abc-1", "abc-1")]
    )
    def test_key_of_usable_ids(self, value: int | str, key: str) -> None:
        """The coalescing key of an integer or a non-empty string ID is its string form."""
        assert key == key_of(value)

    @pytest.mark.parametrize("value", [True, 1.0, None, "", [1], {"a": 1}])
    def test_key_of_unusable_ids(self, value: object) -> None:
        """Anything else has no key."""
        assert None is key_of(value)


class TestValidateFields:
    """Each field besides ID has a type; anything unknown or null is refused."""

    def test_unknown_field(self) -> None:
        """A field the API does not know is refused, named."""
        assert "unknown field 'nickname'" == refused({"ID": 1, "nickname": "Bo"})

    def test_field_names_are_case_sensitive(self) -> None:
        """``LastName`` is not ``lastname``."""
        assert "unknown field 'LastName'" == refused({"ID": 1, "LastName": "Lee"})

    def test_id_in_lower_case_is_missing_id(self) -> None:
        """``id`` is not ``ID``."""
        assert "missing ID" == refused({"id": 1, "lastname": "Lee"})

    @pytest.mark.parametrize("name", TEXT_FIELDS)
    def test_null_text_field(self, name: str) -> None:
        """null never clears a field: it is refused, naming the field."""
        assert f"field {name!r} must be a string, got null" == refused({"ID": 1, name: None})

    @pytest.mark.parametrize(
        ("value", "described"),
        [
            (32470000000, "a number (32470000000)"),
            (1.5, "a number (1.5)"),
            (True, "a boolean (true)"),
            (["a"], 'an array (["a"])'),
            ({"a": 1}, 'an object ({"a":1})'),
        ],
    )
    @pytest.mark.parametrize("name", ["phone", "lastname", "extra8"])
    def test_text_field_of_wrong_type(self, name: str, value: Any, described: str) -> None:
        """A text field that is not a string is refused, naming the field and what it was."""
        assert f"field {name!r} must be a string, got {described}" == refused(
            {"ID": 1, name: value}
        )

    def test_long_values_are_shortened_in_the_reason(self) -> None:
        """A long wrong value is cut in the reason so dead letters stay readable."""
        value = list(range(30))
        text = orjson.dumps(value).decode()
        expected = f"field 'phone' must be a string, got an array ({text[:37]}...)"
        assert expected == refused({"ID": 1, "phone": value})

    def test_integer_beyond_64_bits_is_described(self) -> None:
        """A huge integer (possible from sources not decoded by orjson) gets a reason, not a
        crash."""
        expected = f"field 'phone' must be a string, got a number ({-(2**64)})"
        assert expected == validate({"ID": 1, "phone": -(2**64)})

    @pytest.mark.parametrize("name", TEXT_FIELDS)
    def test_empty_string_clears_a_text_field(self, name: str) -> None:
        """``""`` is a valid value for a text field: it clears it."""
        assert None is validate({"ID": 1, name: ""})

    def test_the_first_problem_is_reported(self) -> None:
        """With several problems, the reason names the first one in the record's order."""
        assert "field 'phone' must be a string, got a number (5)" == refused(
            {"ID": 1, "phone": 5, "nickname": "x"}
        )

    @pytest.mark.parametrize(
        ("value", "described"),
        [
            ("true", 'a string ("true")'),
            (1, "a number (1)"),
            (0, "a number (0)"),
            (None, "null"),
        ],
    )
    def test_unsubscribed_must_be_a_boolean(self, value: Any, described: str) -> None:
        """``unsubscribed`` is true or false, not a string, a number or null."""
        expected = f"field 'unsubscribed' must be true or false, got {described}"
        assert expected == refused({"ID": 1, "unsubscribed": value})

    @pytest.mark.parametrize("value", [True, False])
    def test_unsubscribed_booleans_are_valid(self, value: bool) -> None:
        """Both booleans are valid."""
        assert None is validate({"ID": 1, "unsubscribed": value})


class TestValidateBirthday:
    """``birthday`` is a real calendar date written yyyy-MM-dd, nothing else."""

    @pytest.mark.parametrize(
        "value",
        ["2026-1-5", "2026-01-5", "20261126", "2026/11/26", "26-11-2026", "2026-11-26T00:00", ""],
    )
    def test_wrong_shape(self, value: str) -> None:
        """Other date shapes, even ones ISO 8601 allows, are refused naming the format."""
        expected = f"field 'birthday' must be a date yyyy-MM-dd, got {value!r}"
        assert expected == refused({"ID": 1, "birthday": value})

    @pytest.mark.parametrize(
        "value",
        ["2026-02-30", "2026-13-01", "2026-00-10", "2026-04-31", "2023-02-29", "0000-01-01"],
    )
    def test_not_a_real_date(self, value: str) -> None:
        """The right shape but no such day is refused as not a real date."""
        expected = f"field 'birthday' is not a real calendar date: {value!r}"
        assert expected == refused({"ID": 1, "birthday": value})

    @pytest.mark.parametrize("value", ["2024-02-29", "2000-02-29", "1970-01-01", "2026-12-31"])
    def test_real_dates(self, value: str) -> None:
        """Real dates are valid, the leap day of a leap year included."""
        assert None is validate({"ID": 1, "birthday": value})

    @pytest.mark.parametrize(
        ("value", "described"),
        [
            (20261126, "a number (20261126)"),
            (None, "null"),
            (["2026-11-26"], 'an array (["2026-11-26"])'),
        ],
    )
    def test_not_a_string(self, value: Any, described: str) -> None:
        """A birthday that is not a string is refused naming what it was."""
        expected = f"field 'birthday' must be a date string yyyy-MM-dd, got {described}"
        assert expected == refused({"ID": 1, "birthday": value})


class TestDecodeValid:
    """A valid record becomes a :class:`Change` keyed by the string form of its ID."""

    def test_integer_id(self) -> None:
        """An integer ID is kept as sent; the key is its string form."""
        result = decode(b'{"ID": 123, "lastname": "Lee"}', "t")
        assert Change("123", {"ID": 123, "lastname": "Lee"}, "t") == result

    def test_string_id(self) -> None:
        """A string ID is kept as sent and is its own key."""
        result = decode(b'{"ID": "123", "extra2": "Building 2B"}', "t")
        assert Change("123", {"ID": "123", "extra2": "Building 2B"}, "t") == result

    def test_every_field_at_once(self) -> None:
        """All known fields together are valid."""
        obj: dict[str, Any] = {name: "x" for name in TEXT_FIELDS}
        obj.update(ID=1, birthday="1990-05-17", unsubscribed=False)
        assert FIELDS == set(obj)
        assert Change("1", obj, "t") == decode(orjson.dumps(obj), "t")


TEXT = st.text(max_size=20)
INT64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
VALUES: dict[str, st.SearchStrategy[Any]] = {
    **{name: TEXT for name in TEXT_FIELDS},
    "birthday": st.dates().map(lambda d: d.isoformat()),
    "unsubscribed": st.booleans(),
}
IDS = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**63 - 1), st.text(min_size=1, max_size=12)
)


@st.composite
def valid_changes(draw: st.DrawFn) -> dict[str, Any]:
    """Any valid change: an ID and at least one well-typed field."""
    fields = draw(st.fixed_dictionaries({}, optional=VALUES).filter(bool))
    return {"ID": draw(IDS), **fields}


WRONG = st.one_of(
    st.none(),
    INT64,
    st.floats(allow_nan=False, allow_infinity=False),
    st.lists(INT64, max_size=2),
    st.dictionaries(st.text(max_size=3), INT64, max_size=2),
)


class TestDecodeProperties:
    """Properties over generated changes."""

    @settings(max_examples=300, deadline=None)
    @given(valid_changes())
    def test_any_valid_change_decodes_to_itself(self, obj: dict[str, Any]) -> None:
        """Any valid change decodes to a Change whose fields equal the input, keyed by str(ID)."""
        result = decode(orjson.dumps(obj), "tok")
        assert Change(str(obj["ID"]), obj, "tok") == result

    @settings(max_examples=200, deadline=None)
    @given(valid_changes(), st.data())
    def test_a_wrong_type_is_refused_naming_the_field(
        self, obj: dict[str, Any], data: st.DataObject
    ) -> None:
        """Replacing one field's value with a value of a wrong type makes the change invalid,
        and the reason names that field."""
        name = data.draw(st.sampled_from(sorted(set(obj) - {"ID"})))
        wrong = data.draw(WRONG if name != "unsubscribed" else st.one_of(WRONG, TEXT))
        result = decode(orjson.dumps({**obj, name: wrong}), "tok")
        assert isinstance(result, Invalid)
        assert f"field {name!r} " in result.reason


ANY_VALUE = st.one_of(WRONG, TEXT, st.booleans(), st.just("2024-02-30"), st.just("1990-05-17"))
NAMES = st.sampled_from(sorted(FIELDS | {"id", "Phone", "extra9"}))


class TestFastPathAgreesWithTheFieldByFieldCheck:
    """decode takes a change whose fields all look right through a few C-level calls, and
    every other object through validate's loop: the two must never disagree."""

    @settings(max_examples=500, deadline=None)
    @given(st.dictionaries(NAMES, ANY_VALUE, max_size=6), st.one_of(IDS, WRONG, st.none()))
    def test_decode_accepts_exactly_what_validate_accepts(
        self, fields: dict[str, Any], ident: Any
    ) -> None:
        obj = {**fields, "ID": ident} if ident is not None else fields
        try:
            line = orjson.dumps(obj)
        except TypeError:  # an integer beyond 64 bits: not JSON orjson writes
            return
        result = decode(line, "tok")
        problem = validate(orjson.loads(line))
        if problem is None:
            assert Change(str(obj["ID"]), orjson.loads(line), "tok") == result
        else:
            assert isinstance(result, Invalid)
            assert problem == result.reason


EDGE_LINES = [
    b'{"ID":18446744073709551615,"phone":"a"}',  # past msgspec's int64, orjson reads it
    b'{"ID":-9223372036854775808,"phone":"a"}',
    b'{"ID":"1","phone":"a","phone":"b"}',  # a field twice: the last wins
    b'{"ID":1}',
    b'{"ID":true,"phone":"a"}',
    b'{"ID":"","phone":"a"}',
    b'{"ID":1.0,"phone":"a"}',
    b'{"ID":"1","birthday":"2024-02-30"}',
    b'{"ID":"1","birthday":"2024-2-3"}',
    b'{"ID":"1","birthday":"2024-02-29","unsubscribed":false}',
    b'{"ID":"1","unsubscribed":1}',
    b'{"ID":"1","phone":null}',
    b' {"ID":"1","phone":"a\\u0000\\ud83d\\ude00"} ',
    b'{"ID":"1","phone":"\\ud800"}',
    b'{"ID":"1","Phone":"a"}',
]
"""Lines where a decoder may differ from the careful path: number ranges, repeated fields,
dates, nulls, escapes and unknown names."""


class TestDecodeAll:
    """The hot path's decode of many records gives decode's verdicts, in order."""

    @settings(max_examples=200, deadline=None)
    @given(
        st.lists(
            st.one_of(
                valid_changes().map(orjson.dumps),
                st.dictionaries(NAMES, ANY_VALUE, max_size=4).map(orjson.dumps),
                st.sampled_from([b"{", b"[1]", b"null", b'"x"', b"\xff", *EDGE_LINES]),
            ),
            max_size=12,
        )
    )
    def test_same_verdicts_as_decode_one_by_one(self, lines: list[bytes]) -> None:
        records = list(enumerate(lines))
        valid, invalid = decode_all(records)
        one_by_one = [decode(line, token) for token, line in records]
        assert [(c.key, c.fields, c.token) for c in one_by_one if type(c) is Change] == valid
        assert [i for i in one_by_one if type(i) is Invalid] == invalid

    @settings(max_examples=100, deadline=None)
    @given(
        st.lists(valid_changes().map(orjson.dumps), min_size=1, max_size=12),
        st.sampled_from([None, b'{"ID":"7"}', b'{"ID":7}', b'{"ID":"1","phone":null}']),
        st.integers(0, 12),
    )
    def test_a_slice_plainly_valid_in_one_go(
        self, lines: list[bytes], odd: bytes | None, where: int
    ) -> None:
        """Every record plainly valid (decoded in one go, in C), or one among them not (an
        ID alone, a null: the slice goes one by one): decode's verdicts, in order."""
        if odd is not None:
            lines.insert(where, odd)
        records = [(f"t{n}", line) for n, line in enumerate(lines)]
        valid, invalid = decode_all(records)
        one_by_one = [decode(line, token) for token, line in records]
        assert [(c.key, c.fields, c.token) for c in one_by_one if type(c) is Change] == valid
        assert [i for i in one_by_one if type(i) is Invalid] == invalid
        assert (odd is None) == (len(valid) == len(lines))


class TestKeyMismatch:
    def test_same_string_form_is_no_problem_another_names_both(self) -> None:
        """A change filed under its own ID's string form belongs there (an integer ID 123
        is filed under '123'); under another key, the problem names both."""
        change = decode(b'{"ID": 123, "lastname": "x"}', 1)
        assert isinstance(change, Change)
        assert None is key_mismatch(change.key, "123", "contact_id")
        problem = key_mismatch("100013", "100012", "contact_id")
        assert problem is not None
        assert "ID '100013' does not match the contact_id '100012'" in problem
