"""Prompt templates: files under ``prompts/``, checked and versioned by content hash when loaded.

Each template is a ``str.format`` string whose placeholders are plain names (``{question}``); a
literal brace is written ``{{`` / ``}}``. What each prompt may use is declared here, in code, so a
template that asks for a variable the caller never provides fails at start, not at the first
question. ``render`` fails on a variable the template uses but was not given, and on one that the
prompt does not allow; a variable that is allowed but unused by the current template is accepted,
so a template can stop using ``evidence`` (say) without breaking its callers.

A prompt's version is ``name@`` + the first 12 hex digits of the sha256 of its file's bytes; the
set's version joins them (``system@…+answer@…+no_answer@…+rewrite@…``) and goes on every answer, so an answer
or an eval result can be traced to the exact wording that produced it.
"""

from __future__ import annotations

import hashlib
import string
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from rag.errors import RagError

__all__ = ["PROMPT_SPECS", "Prompt", "PromptError", "PromptSet", "PromptSpec", "load_prompts"]


class PromptError(RagError):
    """A prompt template is missing or malformed, or was rendered with the wrong variables."""

    code = "invalid_prompt"


@dataclass(frozen=True)
class PromptSpec:
    """What a prompt file may use (``allowed``) and must use (``required``)."""

    allowed: frozenset[str]
    required: frozenset[str] = frozenset()


# The prompts the service loads, in the order their versions are joined.
PROMPT_SPECS: dict[str, PromptSpec] = {
    # The system message: rules only, no variables.
    "system": PromptSpec(allowed=frozenset()),
    # The user message: the numbered sources (Context.text), the question, and optionally the
    # extractive evidence (ExtractiveAnswer.text: the best-matching sentences with their [n]).
    "answer": PromptSpec(
        allowed=frozenset({"sources", "question", "evidence"}),
        required=frozenset({"sources", "question"}),
    ),
    # Returned as the answer, without calling a model, when retrieval finds nothing relevant enough.
    "no_answer": PromptSpec(allowed=frozenset({"question"})),
    # Asks the LLM for a follow-up question made standalone, for retrieval (rag/conversation.py):
    # the earlier turns ("User: …" / "Assistant: …" lines) and the last question.
    "rewrite": PromptSpec(allowed=frozenset({"history", "question"}), required=frozenset({"history", "question"})),
}

_FORMATTER = string.Formatter()


@dataclass(frozen=True)
class Prompt:
    """One template. ``variables`` are the placeholders its text uses."""

    name: str
    text: str
    variables: frozenset[str]
    allowed: frozenset[str]
    version: str

    @classmethod
    def from_text(cls, name: str, text: str, spec: PromptSpec, *, origin: str = "") -> Prompt:
        """Parse and check ``text``; ``origin`` (a path) only improves error messages."""
        where = origin or name
        variables = _placeholders(text, where)
        unknown = variables - spec.allowed
        if unknown:
            allowed = ", ".join(sorted(spec.allowed)) or "none"
            raise PromptError(
                f"prompt {where} uses unknown variable(s) {_names(unknown)}; allowed: {allowed}"
            )
        missing = spec.required - variables
        if missing:
            raise PromptError(f"prompt {where} must use variable(s) {_names(missing)}")
        digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]
        return cls(name=name, text=text, variables=variables, allowed=spec.allowed, version=f"{name}@{digest}")

    def render(self, **values: object) -> str:
        """Fill the placeholders; surrounding whitespace of the result is stripped.

        Raises :class:`PromptError` naming the variables that are missing (used by the template,
        not given) or unexpected (not allowed for this prompt).
        """
        unexpected = set(values) - self.allowed
        missing = self.variables - set(values)
        if unexpected or missing:
            problems = []
            if missing:
                problems.append(f"missing {_names(missing)}")
            if unexpected:
                problems.append(f"unexpected {_names(unexpected)}")
            raise PromptError(f"cannot render prompt {self.version}: {'; '.join(problems)}")
        return self.text.format_map({k: str(v) for k, v in values.items()}).strip()


@dataclass(frozen=True)
class PromptSet:
    """The loaded prompts, by name; ``version`` identifies the whole set."""

    prompts: Mapping[str, Prompt]
    version: str

    def __getitem__(self, name: str) -> Prompt:
        try:
            return self.prompts[name]
        except KeyError:
            raise PromptError(f"no prompt named {name!r}; loaded: {', '.join(self.prompts)}") from None

    def __iter__(self) -> Iterator[Prompt]:
        return iter(self.prompts.values())

    @property
    def system(self) -> Prompt:
        return self["system"]

    @property
    def answer(self) -> Prompt:
        return self["answer"]

    @property
    def no_answer(self) -> Prompt:
        return self["no_answer"]

    def answer_messages(self, *, question: str, sources: str, evidence: str = "") -> list[dict[str, str]]:
        """Chat messages for an OpenAI-compatible endpoint: the system rules, then sources + question."""
        values = {"question": question, "sources": sources}
        if "evidence" in self.answer.variables:
            values["evidence"] = evidence
        return [
            {"role": "system", "content": self.system.render()},
            {"role": "user", "content": self.answer.render(**values)},
        ]

    @classmethod
    def from_prompts(cls, prompts: Mapping[str, Prompt]) -> PromptSet:
        ordered = {name: prompts[name] for name in PROMPT_SPECS if name in prompts}
        ordered.update({name: p for name, p in prompts.items() if name not in ordered})
        return cls(prompts=ordered, version="+".join(p.version for p in ordered.values()))


def load_prompts(directory: Path | str, specs: Mapping[str, PromptSpec] | None = None) -> PromptSet:
    """Load ``<name>.md`` for every prompt in ``specs`` (default :data:`PROMPT_SPECS`) from ``directory``.

    Other files (``README.md``) are ignored. Raises :class:`PromptError` when the directory or a
    file is missing, unreadable, not UTF-8, or a template is malformed or uses a variable its
    spec does not allow.
    """
    specs = PROMPT_SPECS if specs is None else specs
    root = Path(directory)
    if not root.is_dir():
        raise PromptError(f"prompts directory {root} does not exist")
    missing = [f"{name}.md" for name in specs if not (root / f"{name}.md").is_file()]
    if missing:
        raise PromptError(f"prompts directory {root} lacks {', '.join(missing)}")
    prompts: dict[str, Prompt] = {}
    for name, spec in specs.items():
        path = root / f"{name}.md"
        try:
            text = path.read_bytes().decode("utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise PromptError(f"cannot read prompt {path}: {exc}") from exc
        prompts[name] = Prompt.from_text(name, text, spec, origin=str(path))
    return PromptSet.from_prompts(prompts)


def _placeholders(text: str, where: str) -> frozenset[str]:
    names: set[str] = set()
    try:
        fields = list(_FORMATTER.parse(text))
    except ValueError as exc:
        raise PromptError(f"prompt {where} is not a valid template ({exc}); write literal braces as {{{{ }}}}") from exc
    for _, field_name, format_spec, conversion in fields:
        if field_name is None:
            continue
        if not field_name.isidentifier() or format_spec or conversion:
            shown = "{" + field_name
            shown += (f"!{conversion}" if conversion else "") + (f":{format_spec}" if format_spec else "") + "}"
            raise PromptError(
                f"prompt {where} has placeholder {shown}; only plain names like {{question}} are allowed"
            )
        names.add(field_name)
    return frozenset(names)


def _names(names: set[str] | frozenset[str]) -> str:
    return ", ".join(sorted(names))
