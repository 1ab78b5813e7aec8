"""Follow-up questions made standalone for retrieval.

In a conversation the last question often leans on the one before: "When did the Normans conquer
England?" … "and when did it end?". Retrieved alone, "and when did it end?" finds nothing in
particular. :class:`QueryRewriter` turns it into a standalone retrieval query:

- ``llm``: with an LLM endpoint configured (``RAG_LLM_BASE_URL`` and ``RAG_QUERY_REWRITE=auto``, or
  any LLM with ``RAG_QUERY_REWRITE=llm``), the ``rewrite`` prompt (``prompts/rewrite.md``, versioned
  like the other prompts) asks it for the standalone question. The call is bounded by
  ``RAG_REWRITE_TIMEOUT_S``; on an LLM error, a timeout or an unusable reply (:func:`_usable`) the
  deterministic rewrite below is used and ``error`` says why. ``auto`` does not ask the bundled
  SmolLM2-135M: on 14 multi-turn cases built from SQuAD dev calibration paragraphs it answered
  instead of rewriting 12 times (2 usable rewrites) and took 1–5 s each.
- ``carried_terms``: without an LLM for rewriting (or ``RAG_QUERY_REWRITE=terms``), when the question *looks like*
  a follow-up (:func:`looks_like_follow_up`: it starts with "and"/"what about"/…, or it refers back
  with a pronoun and names nothing itself, or it is too short to carry a subject), the key terms of the
  previous question (names, numbers, content words; :func:`key_terms`) are appended to it. A
  follow-up that names something of its own ("what about Germany?") keeps the previous content words
  but not the previous names, which it replaces. The previous question is itself taken in its
  rewritten form, so a chain of follow-ups keeps its subject.
- ``none``: the first question of a conversation, a question that does not look like a follow-up,
  or ``RAG_QUERY_REWRITE=off``: the question is the query.

The LLM is asked only when the question looks like a follow-up, too: a standalone question costs no
LLM call and cannot be mangled by a small model.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from typing import Literal

import anyio
import msgspec
import structlog

from rag.llm import LLM, LLMError
from rag.prompts import PromptSet

__all__ = ["Rewrite", "QueryRewriter", "carry_terms", "key_terms", "looks_like_follow_up"]

log = structlog.get_logger("rag.conversation")

RewriteMethod = Literal["llm", "carried_terms", "none"]

# Words that start a follow-up ("and when did it end?", "what about Germany?").
_CONNECTIVE = re.compile(
    r"^\s*(?:and|but|also|so|then|plus|what about|how about|and what about|and how about|what of|same for)\b[\s,]*",
    re.I)
# Words that point back to something named before. "that"/"there" are left out: mostly not references.
_PRONOUNS = frozenset("it its itself he him his himself she her hers herself they them their theirs themselves "
                      "this these those former latter".split())
_WH = frozenset("what which who whom whose when where why how".split())
_STOP = frozenset(
    """a an the and or but if of to in on at by for from with without as is are was were be been being am do does
    did done has have had having it its this that these those there here than then so such not no nor can could
    should would may might must will shall into onto about above below over under between during before after up
    down out off again further once all any both each few more most other some own same too very just also i me my
    we our you your he him his she her they them their one many much what which who whom whose when where why how
    tell please know give name did does get got""".split())
_WORD = re.compile(r"[A-Za-z\u00c0-\u024f][\w'\-\u00c0-\u024f]*|\d[\d,.]*\d|\d")
MAX_CARRIED_TERMS = 10
HISTORY_CHARS = 300  # each earlier turn, as the rewrite prompt shows it
MAX_REWRITE_CHARS = 400


class Rewrite(msgspec.Struct, kw_only=True, frozen=True):
    """The query retrieval uses, how it was made, and why the LLM's rewrite was not used (if it was asked)."""

    query: str
    method: RewriteMethod
    error: str | None = None
    ms: float = 0.0
    usage: dict[str, int] = msgspec.field(default_factory=dict)  # the LLM rewrite's tokens (counted in the quota)


def _tokens(text: str) -> list[str]:
    return _WORD.findall(text)


def _is_name(token: str, first: bool) -> bool:
    """A capitalised word that is not a question or stop word ("Normans", "Rollo"), or an acronym."""
    if not token[0].isupper():
        return False
    return not (first and token.lower() in _STOP) and token.lower() not in _STOP


def _is_number(token: str) -> bool:
    return token[0].isdigit()


def key_terms(question: str) -> list[str]:
    """Names, numbers and content words of ``question``, in order, once each (case-insensitive)."""
    seen: set[str] = set()
    out = []
    for tok in _tokens(question):
        low = tok.lower()
        if low in seen or low in _STOP or (len(tok) < 3 and not _is_number(tok)):
            continue
        seen.add(low)
        out.append(tok)
    return out[:MAX_CARRIED_TERMS]


def _names(question: str) -> list[str]:
    return [t for i, t in enumerate(_tokens(question)) if _is_name(t, i == 0) or _is_number(t)]


def looks_like_follow_up(question: str) -> bool:
    """True when ``question`` seems to lean on an earlier one (see the module docstring)."""
    if _CONNECTIVE.match(question):
        return True
    tokens = _tokens(question)
    names = [t for t in _names(question) if not _is_number(t)]  # a year or a count names no subject
    content = [t for t in tokens if t.lower() not in _STOP and len(t) > 2]
    if any(t.lower() in _PRONOUNS for t in tokens) and not names:
        return True
    return len(content) <= 1 and not names


def carry_terms(question: str, previous: str) -> str:
    """``question`` with the key terms of ``previous`` it lacks appended (names only if it has none)."""
    own = {t.lower() for t in _tokens(question)}
    has_names = any(not _is_number(t) for t in _names(_CONNECTIVE.sub("", question)))
    previous_names = {t.lower() for t in _names(previous)}
    carried = [t for t in key_terms(previous)
               if t.lower() not in own and not (has_names and t.lower() in previous_names)]
    stripped = _CONNECTIVE.sub("", question).strip() or question.strip()
    return f"{stripped} {' '.join(carried)}".strip() if carried else stripped


def user_turns(history: Sequence[dict[str, str]]) -> list[str]:
    return [m["content"].strip() for m in history if m.get("role") == "user" and (m.get("content") or "").strip()]


def standalone_by_terms(question: str, history: Sequence[dict[str, str]]) -> tuple[str, bool]:
    """The deterministic rewrite: each earlier user turn made standalone in order, then ``question``."""
    standing: str | None = None
    for turn in user_turns(history):
        standing = turn if standing is None or not looks_like_follow_up(turn) else carry_terms(turn, standing)
    if standing is None or not looks_like_follow_up(question):
        return question, False
    return carry_terms(question, standing), True


class QueryRewriter:
    """Rewrites a follow-up into a standalone retrieval query (see the module docstring)."""

    def __init__(self, *, llm: LLM | None, prompts: PromptSet, enabled: bool = True, timeout_s: float = 5.0,
                 history_messages: int = 4) -> None:
        """``llm``: the model that rewrites (None: key terms only); ``enabled`` False: never rewrite."""
        self.llm = llm if llm is not None and "rewrite" in prompts.prompts else None
        self.prompts = prompts
        self.enabled = enabled
        self.timeout_s = timeout_s
        self.history_messages = history_messages

    @classmethod
    def from_settings(cls, settings, *, llm: LLM | None, prompts: PromptSet, history_messages: int = 4) -> QueryRewriter:
        """``RAG_QUERY_REWRITE``: auto asks the LLM only at an endpoint of the operator's (``RAG_LLM_BASE_URL``)."""
        mode = settings.query_rewrite
        use_llm = mode == "llm" or (mode == "auto" and bool(settings.llm_base_url))
        return cls(llm=llm if use_llm else None, prompts=prompts, enabled=mode != "off",
                   timeout_s=settings.rewrite_timeout_s, history_messages=history_messages)

    async def rewrite(self, question: str, history: Sequence[dict[str, str]]) -> Rewrite:
        started = time.perf_counter()
        if not self.enabled or not user_turns(history) or not looks_like_follow_up(question):
            return Rewrite(query=question, method="none")
        error, usage = None, {}
        if self.llm is not None:
            try:
                query, usage = await self._ask_llm(question, history)
            except LLMError as exc:
                error = f"LLM rewrite failed: {exc.message}"
            except TimeoutError:
                error = f"LLM rewrite took longer than {self.timeout_s}s"
            else:
                if query is not None:
                    return Rewrite(query=query, method="llm", ms=_ms(started), usage=usage)
                error = "LLM rewrite was unusable"
            log.warning("rewrite_llm_fallback", error=error)
        query, changed = standalone_by_terms(question, history)
        return Rewrite(query=query, method="carried_terms" if changed else "none", error=error, ms=_ms(started),
                       usage=usage)

    async def _ask_llm(self, question: str, history: Sequence[dict[str, str]]) -> tuple[str | None, dict[str, int]]:
        turns = [m for m in history if m.get("role") in ("user", "assistant") and (m.get("content") or "").strip()]
        shown = "\n".join(f"{'User' if m['role'] == 'user' else 'Assistant'}: {_clip(m['content'])}"
                          for m in turns[-self.history_messages:])
        prompt = self.prompts["rewrite"].render(history=shown, question=question)
        assert self.llm is not None
        with anyio.fail_after(self.timeout_s):
            done = await self.llm.complete([{"role": "user", "content": prompt}], max_tokens=64, temperature=0.0)
        return _usable(done.text, question), dict(done.usage)


def _usable(text: str, question: str) -> str | None:
    """The first line of the reply, without a label or quotes, if it reads as the question made standalone.

    A small model often answers instead of rewriting (or says it does not know), repeats the earlier
    question, or returns the follow-up unchanged: a reply is used only when it is a question (ends
    with "?"), no longer looks like a follow-up itself, and keeps at least half of the follow-up's
    content words.
    """
    line = next((ln.strip() for ln in text.strip().splitlines() if ln.strip()), "")
    line = re.sub(r"^(?:standalone question|question|rewritten question)\s*:\s*", "", line, flags=re.I)
    line = line.strip().strip("\"'\u201c\u201d`").strip()
    if not line.endswith("?") or len(line) > max(MAX_REWRITE_CHARS, 3 * len(question)):
        return None
    if looks_like_follow_up(line):
        return None
    own = _stems(question)
    if own and len(own & _stems(line)) < len(own) / 2:
        return None
    return line


def _stems(text: str) -> set[str]:
    return {t.lower()[:5] for t in _tokens(_CONNECTIVE.sub("", text)) if t.lower() not in _STOP and len(t) > 2}


def _clip(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= HISTORY_CHARS else text[: HISTORY_CHARS - 1] + "…"


def _ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 2)
