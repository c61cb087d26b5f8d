"""The tests' leak detector (tests/integration/masking_fixture.py `leaks`): what it must find
and the chance matches it must not report. Every test that says "nothing personal in this
output" trusts it, so it is tested on its own, without a database."""

from __future__ import annotations

import hashlib

from tests.integration.masking_fixture import CARD, PHONE, SECRETS, leaks

CARD_WINDOW = SECRETS["card"][2:8]  # six digits of the card number's core
PHONE_WINDOW = SECRETS["phone"][:6]


def test_a_window_of_a_secret_in_plain_text_is_found() -> None:
    assert leaks(f"customer called from {PHONE_WINDOW}") == ["phone"]
    assert leaks(f'"value":"{CARD_WINDOW}"') == ["card"]
    assert leaks(f"reversed {CARD_WINDOW[::-1]}") == ["card"]


def test_whole_secrets_and_their_encodings_are_found_anywhere() -> None:
    assert "card" in leaks(f'"hash":"ab{SECRETS["card"]}cd0123456789"')
    assert "encoded:" + PHONE[:3] in leaks(hashlib.md5(PHONE.encode()).hexdigest())
    assert "card" in leaks(f"card {CARD}")


def test_six_digits_by_chance_inside_an_audit_hash_are_not_a_leak() -> None:
    # an event's id/prev/hash: hex digests, which hold six digits in a row now and then
    digest = "9f3c" + CARD_WINDOW + "e1d2a7b0c4" + PHONE_WINDOW + "ff"
    assert leaks(f'{{"id":"{digest}","prev":"{digest}","hash":"{digest}"}}') == []


def test_a_long_run_of_digits_alone_is_still_searched() -> None:
    # only hex tokens with a letter are passed over: a card number is all digits
    assert leaks("0000" + CARD_WINDOW + "0000000000") == ["card"]
