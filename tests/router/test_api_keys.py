"""API keys: what `--api-keys-file` and `KVRELAY_API_KEYS` accept, and which
`authorization` values pass."""

from __future__ import annotations

from pathlib import Path

import pytest

from router.api_keys import ApiKeyError, ApiKeys


def test_no_keys_leave_the_api_open() -> None:
    keys = ApiKeys.load(None, environ={})
    assert not keys.is_required
    assert keys.allows(None) and keys.allows("Bearer anything")


def test_a_keys_file_takes_one_key_per_line_with_comments(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text("# team a\nsk-a\n\n  sk-b  \n")
    keys = ApiKeys.load(str(path), environ={"KVRELAY_API_KEYS": "sk-env"})
    assert keys.is_required
    assert keys.allows("Bearer sk-a") and keys.allows("bearer sk-b")
    assert not keys.allows("Bearer sk-env"), "the file wins over the variable"


@pytest.mark.parametrize(
    "authorization", [None, "", "sk-a", "Bearer", "Bearer sk-", "Bearer sk-ab", "Basic sk-a"]
)
def test_anything_but_bearer_and_a_listed_key_is_refused(authorization) -> None:
    keys = ApiKeys.load(None, environ={"KVRELAY_API_KEYS": "sk-a, sk-b"})
    assert keys.allows("Bearer sk-a") and keys.allows("Bearer sk-b")
    assert not keys.allows(authorization)


def test_unusable_keys_files_are_errors_that_say_what_to_change(tmp_path: Path) -> None:
    with pytest.raises(ApiKeyError, match=r"(?i)no such file"):
        ApiKeys.load(str(tmp_path / "missing"))
    empty = tmp_path / "empty"
    empty.write_text("# nothing yet\n")
    with pytest.raises(ApiKeyError, match="holds no key"):
        ApiKeys.load(str(empty))
    spaced = tmp_path / "spaced"
    spaced.write_text("sk a\n")
    with pytest.raises(ApiKeyError, match="one per line"):
        ApiKeys.load(str(spaced))
