"""``ExposedPort``: Koyeb's ``.port`` / ``.exposed_at`` attributes, sandlot's mapping reads, and
a malformed server answer refused with the field it lacks (never a KeyError or AttributeError
from deep inside the SDK)."""

from __future__ import annotations

import pytest

from sandlot.sdk import ExposedPort

ANSWER = {
    "port": 8080,
    "exposed_at": "http://127.0.0.1:4000/sandboxes/s/ports/8080/",
    "host_url": None,
    "protocol": "http",
    "token": "t",
    "since": "2026-11-30T00:00:00",
}


def test_attributes_and_mapping_agree() -> None:
    exposed = ExposedPort.from_answer(ANSWER)
    assert exposed.port == exposed["port"] == 8080
    assert exposed.exposed_at == exposed["exposed_at"] == ANSWER["exposed_at"]
    assert dict(exposed) == ANSWER
    assert exposed.get("token") == "t" and exposed.get("nope") is None
    with pytest.raises(KeyError):
        exposed["nope"]


@pytest.mark.parametrize(
    ("answer", "field"),
    [
        ([1], "object"),
        ({**ANSWER, "port": "8080"}, "port"),
        ({**ANSWER, "port": True}, "port"),
        ({**ANSWER, "port": 70000}, "port"),
        ({k: v for k, v in ANSWER.items() if k != "exposed_at"}, "exposed_at"),
        ({**ANSWER, "token": 5}, "token"),
        ({**ANSWER, "host_url": []}, "host_url"),
        ({**ANSWER, "protocol": 5}, "protocol"),
    ],
)
def test_malformed_answers_name_the_field(answer: object, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        ExposedPort.from_answer(answer)
