"""``rag.settings.load_settings``: defaults, typed overrides, and errors that name the variable."""

from __future__ import annotations

import typing
from pathlib import Path

import pytest

from rag.errors import SettingsError
from rag.settings import Settings, load_settings


def test_defaults_from_an_empty_environment():
    s = load_settings(env={})
    assert s == Settings()
    assert s.data_dir == Path("data")
    assert s.qdrant_url == ""
    assert (s.host, s.port) == ("127.0.0.1", 8000)
    assert (s.chunk_tokens, s.chunk_overlap, s.tokenizer_encoding) == (200, 32, "cl100k_base")
    assert s.run_worker == "auto" and s.log_format == "auto" and s.log_level == "info"
    assert s.embedded and s.worker_in_process
    assert s.qdrant_dir == Path("data") / "qdrant"
    assert s.registry_path == Path("data") / "registry.sqlite3"
    assert s.uploads_dir == Path("data") / "uploads"


HINTS = typing.get_type_hints(Settings)
FIELDS = list(Settings.__struct_fields__)


def _var(field: str) -> str:
    return f"RAG_{field.upper()}"


def _fields_of(kind) -> list[str]:
    return [f for f in FIELDS if HINTS[f] is kind]


def _literal_fields() -> list[str]:
    return [f for f in FIELDS if typing.get_origin(HINTS[f]) is typing.Literal]


@pytest.mark.parametrize("field", FIELDS)
def test_every_setting_accepts_its_default_written_as_an_environment_string(field):
    # Whatever a variable's type, the environment only ever holds strings.
    default = getattr(Settings(), field)
    s = load_settings(env={_var(field): str(default)})
    assert getattr(s, field) == default
    assert type(getattr(s, field)) is type(default)


@pytest.mark.parametrize("field", _fields_of(Path))
def test_path_settings_are_paths(field):
    s = load_settings(env={_var(field): "/srv/rag/x"})
    assert isinstance(getattr(s, field), Path) and getattr(s, field) == Path("/srv/rag/x")


@pytest.mark.parametrize("field", _fields_of(int) + _fields_of(float))
def test_every_numeric_setting_rejects_text_naming_its_variable(field):
    with pytest.raises(SettingsError, match=_var(field)):
        load_settings(env={_var(field): "abc"})


@pytest.mark.parametrize("field", _literal_fields())
def test_every_choice_setting_rejects_an_unknown_value_naming_its_variable(field):
    for allowed in typing.get_args(HINTS[field]):
        assert getattr(load_settings(env={_var(field): allowed}), field) == allowed
    with pytest.raises(SettingsError, match=_var(field)):
        load_settings(env={_var(field): "foo"})


def test_variables_without_the_prefix_are_ignored():
    s = load_settings(env={"HOME": "/root", "RAGTIME": "1", "rag_port": "1", "PATH": "/bin"})
    assert s == Settings()


def test_valid_overrides_are_typed():
    s = load_settings(env={
        "RAG_DATA_DIR": "/srv/rag",
        "RAG_PORT": "9001",
        "RAG_QDRANT_TIMEOUT_S": "2.5",
        "RAG_WORKER_POLL_S": "0.1",
        "RAG_CHUNK_TOKENS": "64",
        "RAG_CHUNK_OVERLAP": "0",
        "RAG_TOKENIZER_ENCODING": "o200k_base",
        "RAG_QDRANT_URL": "http://qdrant:6333",
        "RAG_RUN_WORKER": "no",
        "RAG_LOG_FORMAT": "json",
        "RAG_HOST": "0.0.0.0",
    })
    assert isinstance(s.data_dir, Path) and s.data_dir == Path("/srv/rag")
    assert s.qdrant_dir == Path("/srv/rag/qdrant")
    assert s.registry_path == Path("/srv/rag/registry.sqlite3")
    assert type(s.port) is int and s.port == 9001
    assert type(s.chunk_tokens) is int and s.chunk_tokens == 64
    assert type(s.chunk_overlap) is int and s.chunk_overlap == 0
    assert type(s.qdrant_timeout_s) is float and s.qdrant_timeout_s == 2.5
    assert type(s.worker_poll_s) is float and s.worker_poll_s == 0.1
    assert s.tokenizer_encoding == "o200k_base"
    assert s.qdrant_url == "http://qdrant:6333"
    assert s.run_worker == "no" and s.log_format == "json" and s.host == "0.0.0.0"


def test_relative_data_dir_is_a_path():
    s = load_settings(env={"RAG_DATA_DIR": "var/data"})
    assert s.data_dir == Path("var/data") and s.uploads_dir == Path("var/data/uploads")


def test_keyword_overrides_win_over_the_environment():
    # `python -m rag serve --port` passes the port this way.
    s = load_settings(env={"RAG_PORT": "9001"}, port=9002, host="0.0.0.0")
    assert s.port == 9002 and s.host == "0.0.0.0"


def test_reads_os_environ_when_no_mapping_is_given(monkeypatch):
    import os

    for key in [k for k in os.environ if k.startswith("RAG_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("RAG_PORT", "8123")
    assert load_settings().port == 8123
    monkeypatch.setenv("RAG_BOGUS", "x")
    with pytest.raises(SettingsError, match="RAG_BOGUS"):
        load_settings()


def _needs(field: str):
    return pytest.mark.skipif(field not in FIELDS, reason=f"no {field} setting")


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        # not a number
        ({"RAG_CHUNK_TOKENS": "abc"}, "RAG_CHUNK_TOKENS"),
        ({"RAG_PORT": "eighty"}, "RAG_PORT"),
        ({"RAG_PORT": "80.5"}, "RAG_PORT"),
        ({"RAG_QDRANT_TIMEOUT_S": "soon"}, "RAG_QDRANT_TIMEOUT_S"),
        ({"RAG_JOB_MAX_ATTEMPTS": ""}, "RAG_JOB_MAX_ATTEMPTS"),
        # out of range
        ({"RAG_PORT": "70000"}, "RAG_PORT"),
        ({"RAG_PORT": "0"}, "RAG_PORT"),
        ({"RAG_CHUNK_TOKENS": "8"}, "RAG_CHUNK_TOKENS"),
        ({"RAG_ENCODER_BATCH_SIZE": "0"}, "RAG_ENCODER_BATCH_SIZE"),
        ({"RAG_JOB_MAX_ATTEMPTS": "0"}, "RAG_JOB_MAX_ATTEMPTS"),
        ({"RAG_TORCH_THREADS": "-1"}, "RAG_TORCH_THREADS"),
        ({"RAG_MAX_TOP_K": "0"}, "RAG_MAX_TOP_K"),
        ({"RAG_HNSW_EF_CONSTRUCT": "3"}, "RAG_HNSW_EF_CONSTRUCT"),
        # overlap must stay below the chunk size
        ({"RAG_CHUNK_OVERLAP": "200"}, "RAG_CHUNK_OVERLAP"),
        ({"RAG_CHUNK_TOKENS": "64", "RAG_CHUNK_OVERLAP": "64"}, "RAG_CHUNK_OVERLAP"),
        ({"RAG_CHUNK_OVERLAP": "-1"}, "RAG_CHUNK_OVERLAP"),
        # not one of the allowed literals
        ({"RAG_TOKENIZER_ENCODING": "foo"}, "RAG_TOKENIZER_ENCODING"),
        ({"RAG_RUN_WORKER": "maybe"}, "RAG_RUN_WORKER"),
        ({"RAG_LOG_FORMAT": "xml"}, "RAG_LOG_FORMAT"),
        ({"RAG_LOG_LEVEL": "verbose"}, "RAG_LOG_LEVEL"),
        # a Qdrant URL needs an http(s) scheme
        ({"RAG_QDRANT_URL": "ftp://qdrant:6333"}, "RAG_QDRANT_URL"),
        ({"RAG_QDRANT_URL": "qdrant:6333"}, "RAG_QDRANT_URL"),
        # weights (each names itself, not its sibling)
        pytest.param({"RAG_DENSE_WEIGHT": "-1"}, "RAG_DENSE_WEIGHT", marks=_needs("dense_weight")),
        pytest.param({"RAG_SPARSE_WEIGHT": "-1"}, "RAG_SPARSE_WEIGHT", marks=_needs("sparse_weight")),
        # unknown variables (typos) fail instead of being ignored
        ({"RAG_NOPE": "1"}, "RAG_NOPE"),
        ({"RAG_CHUNK_TOKEN": "100"}, "RAG_CHUNK_TOKEN"),
    ],
)
def test_bad_values_name_their_variable(env, variable):
    with pytest.raises(SettingsError) as info:
        load_settings(env=env)
    message = str(info.value)
    assert variable in message, message
    # A user sees this at start-up; a traceback dump or a msgspec path is not an explanation.
    assert "$." not in message


def test_unknown_variable_lists_the_known_ones():
    with pytest.raises(SettingsError) as info:
        load_settings(env={"RAG_NOPE": "1"})
    assert "RAG_CHUNK_TOKENS" in str(info.value) and "RAG_DATA_DIR" in str(info.value)


def test_settings_error_is_a_rag_error():
    from rag.errors import RagError

    assert issubclass(SettingsError, RagError)


@pytest.mark.parametrize(
    ("qdrant_url", "run_worker", "embedded", "in_process"),
    [
        ("", "auto", True, True),
        ("", "yes", True, True),
        ("", "no", True, False),
        ("http://qdrant:6333", "auto", False, False),
        ("https://qdrant.example:6333", "yes", False, True),
        ("http://qdrant:6333", "no", False, False),
    ],
)
def test_embedded_and_worker_in_process(qdrant_url, run_worker, embedded, in_process):
    env = {"RAG_RUN_WORKER": run_worker}
    if qdrant_url:
        env["RAG_QDRANT_URL"] = qdrant_url
    s = load_settings(env=env)
    assert s.embedded is embedded
    assert s.worker_in_process is in_process


def test_settings_are_frozen():
    s = load_settings(env={})
    with pytest.raises(AttributeError):
        s.port = 1  # type: ignore[misc]


def test_the_registry_database_is_sqlite_unless_a_postgresql_url_is_given():
    assert load_settings(env={}).database_url == ""
    url = "postgresql://rag:secret@db:5432/rag"
    s = load_settings(env={"RAG_DATABASE_URL": url, "RAG_DATABASE_POOL_MAX_SIZE": "4"})
    assert (s.database_url, s.database_pool_min_size, s.database_pool_max_size) == (url, 1, 4)
    with pytest.raises(SettingsError, match="RAG_DATABASE_URL") as caught:
        load_settings(env={"RAG_DATABASE_URL": "mysql://rag:secret@db/rag"})
    assert "secret" not in str(caught.value)
    with pytest.raises(SettingsError, match="RAG_DATABASE_POOL_MAX_SIZE"):
        load_settings(env={"RAG_DATABASE_POOL_MIN_SIZE": "5", "RAG_DATABASE_POOL_MAX_SIZE": "2"})
    with pytest.raises(SettingsError, match="RAG_DATABASE_POOL_TIMEOUT_S"):
        load_settings(env={"RAG_DATABASE_POOL_TIMEOUT_S": "0"})


def test_a_database_url_is_shown_without_its_password():
    from rag.settings import redacted_url

    assert redacted_url("postgresql://rag:s3cr:et@db:5432/rag") == "postgresql://rag:***@db:5432/rag"
    assert redacted_url("postgresql://db/rag?user=rag&password=s3cret&sslmode=require") == \
        "postgresql://db/rag?user=rag&password=***&sslmode=require"
    assert redacted_url("postgresql://rag@db/rag") == "postgresql://rag@db/rag"
    assert redacted_url("") == ""
