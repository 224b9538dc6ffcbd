"""The one masking rule set (CONTRACT §2): set secrets read ********, api_key may show its
last four characters, unset ones read null, and a placeholder sent back is refused."""

from __future__ import annotations

import pytest

from ctsd.errors import CtsdError
from ctsd.redact import MASK, mask, refuse_placeholders


def test_mask_rules() -> None:
    record = {
        "name": "Bybit",
        "api_key": "abcdefghijkl1234",
        "api_secret": "s3cr3t",
        "api_passphrase": "",
        "extra": None,
    }
    assert mask(record) == {
        "name": "Bybit",
        "api_key": "…1234",
        "api_secret": MASK,
        "api_passphrase": None,  # set to "" is unset: null, not ""
        "extra": None,
    }
    assert mask({"api_key": "short"}) == {"api_key": MASK}  # too short to show a tail
    nested = {"projectX": {"apiKey": "x" * 20, "password": "p", "username": "u"}}
    assert mask(nested) == {"projectX": {"apiKey": "…xxxx", "password": MASK, "username": "u"}}
    assert mask([{"token": "t"}]) == [{"token": MASK}]


@pytest.mark.parametrize("value", [MASK, "…1234"])
def test_placeholder_sent_back_is_refused(value: str) -> None:
    with pytest.raises(CtsdError) as e:
        refuse_placeholders({"list": [{"api_secret": value}]}, "$.changes")
    assert e.value.code == "invalid" and e.value.path == "$.changes.list[0].api_secret"
    assert value not in e.value.message


def test_non_secret_fields_may_hold_anything() -> None:
    refuse_placeholders({"name": MASK, "note": "…1234"})
