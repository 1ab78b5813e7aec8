"""rag.tokens: tiktoken encodings provided offline from bundled copies."""

from __future__ import annotations

import hashlib
import os

import pytest
import tiktoken
import tiktoken.load
import tiktoken.registry

from rag import tokens

CL100K_KEY = "9b5ad71b2ce5302211f9c61530b329a4922fc6a4"
O200K_KEY = "fb374d419588a4632f3f557e76b4b70aebbca790"


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path):
    """A fresh cache dir, empty encoding caches, and any download attempt fails the test."""
    cache = tmp_path / "tiktoken-cache"
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache))
    monkeypatch.setattr(tokens, "_encodings", {})
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})

    def no_network(blobpath: str) -> bytes:
        raise AssertionError(f"tiktoken tried to download {blobpath}")

    monkeypatch.setattr(tiktoken.load, "read_file", no_network)
    return cache


def test_cache_keys_are_sha1_of_download_urls() -> None:
    assert tokens._SPECS["cl100k_base"].cache_key == CL100K_KEY
    assert tokens._SPECS["o200k_base"].cache_key == O200K_KEY


@pytest.mark.parametrize(
    ("name", "key", "expected"),
    [
        ("cl100k_base", CL100K_KEY, [15339, 1917]),
        ("o200k_base", O200K_KEY, [24912, 2375]),
    ],
)
def test_get_encoding_offline_seeds_cache(offline, name, key, expected) -> None:
    enc = tokens.get_encoding(name)
    assert isinstance(enc, tiktoken.Encoding)
    assert enc.name == name
    assert enc.encode_ordinary("hello world") == expected
    cached = offline / key
    assert cached.is_file()
    assert hashlib.sha256(cached.read_bytes()).hexdigest() == tokens._SPECS[name].sha256
    # atomic write leaves no temporary files behind
    assert sorted(p.name for p in offline.iterdir()) == [key]


def test_get_encoding_is_cached_per_name(offline) -> None:
    a = tokens.get_encoding()
    assert tokens.get_encoding("cl100k_base") is a
    assert tokens.get_encoding("o200k_base") is not a


def test_unknown_encoding_is_a_clear_value_error(offline) -> None:
    with pytest.raises(ValueError, match="unknown tiktoken encoding 'gpt2'.*cl100k_base"):
        tokens.get_encoding("gpt2")
    with pytest.raises(ValueError, match="unknown"):
        tokens.ensure_cached("nope")


def test_corrupt_cached_file_is_replaced(offline) -> None:
    offline.mkdir(parents=True)
    (offline / CL100K_KEY).write_bytes(b"garbage")
    enc = tokens.get_encoding()
    assert enc.encode_ordinary("hello world") == [15339, 1917]
    digest = hashlib.sha256((offline / CL100K_KEY).read_bytes()).hexdigest()
    assert digest == tokens._SPECS["cl100k_base"].sha256


def test_default_cache_dir_is_per_user_and_exported(offline, monkeypatch, tmp_path) -> None:
    monkeypatch.delenv("TIKTOKEN_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    tokens.get_encoding()
    expected = tmp_path / "xdg" / "rag" / "tiktoken"
    assert os.environ["TIKTOKEN_CACHE_DIR"] == str(expected)
    assert (expected / CL100K_KEY).is_file()


def test_empty_cache_env_is_treated_as_unset(offline, monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg2"))
    assert tokens.cache_dir() == tmp_path / "xdg2" / "rag" / "tiktoken"


def test_missing_bundled_files_fail_clearly(offline, monkeypatch) -> None:
    monkeypatch.setattr(tokens, "_bundled_files", lambda name: iter(()))
    with pytest.raises(FileNotFoundError, match="bpe-openai"):
        tokens.get_encoding("o200k_base")


def test_bundled_copies_are_found_in_both_packages() -> None:
    found = {str(path) for path, _ in tokens._bundled_files("cl100k_base")}
    assert any("tiktoken_ext" in p for p in found)
    assert any("bpe_openai" in p for p in found)


def test_count_tokens_treats_special_tokens_as_text() -> None:
    enc = tokens.get_encoding()
    assert tokens.count_tokens("hello world") == 2
    assert tokens.count_tokens("hello world", enc) == 2
    # the special token's text is counted as ordinary text instead of raising
    assert tokens.count_tokens("a <|endoftext|> b") > 3
    assert tokens.count_tokens("") == 0
