"""What every user-facing error must do: the expected message, advice on what to do, one line."""
import re

import pytest

# a message says what is expected or what to do, not only what went wrong
ADVICE = re.compile(r"must|expects|needs?|use |convert|reshape|check|choose|pass |one of|sum the", re.I)


def check(raises, match, call, *, one_line: bool = True) -> None:
    with pytest.raises(raises) as caught:
        call()
    message = str(caught.value)
    assert re.search(match, message), message
    assert ADVICE.search(message), f"no advice in: {message}"
    if one_line:
        assert "\n" not in message.strip(), message
