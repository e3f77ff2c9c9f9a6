"""``compose_reply``: the answer to the customer, grounded in the articles knowledge_search found.

Written by the LLM when one is configured, else (or when the call fails) from the top articles' sentences;
every reply ends with ``Sources: <title> (<slug>), ...``. See docs/skills.md, "compose_reply".
"""

from __future__ import annotations

import re
from typing import Any

from skills.registry import SkillContext, SkillError, skill

from . import llm
from .knowledge import query_terms
from .text import stem
from .ticket import Ticket, content_of, ticket_of

HISTORY_MESSAGES = 6  # the conversation's last messages the LLM sees
PROMPT_ARTICLES = 3
MAX_SENTENCES = 3
SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9])")
SOURCES_LINE = re.compile(r"\n*^\s*sources?:.*\Z", re.IGNORECASE | re.MULTILINE | re.DOTALL)

OPENINGS = {
    "billing": "Thanks for getting in touch about your payment.",
    "technical": "Thanks for letting us know about the problem you ran into.",
    "complaint": "I am sorry about this experience, and thank you for telling us.",
    "sales": "Thanks for your interest in ordering with us.",
    "faq": "Thanks for your question.",
    "general": "Thanks for contacting us.",
}
APOLOGY = "I am really sorry for the trouble this has caused you."
CLOSING = "If anything is still unclear, just reply to this message and we will help."
NO_ARTICLES = (
    "We could not find an answer to your question in our help centre, so a member of our team "
    "will look at your message and follow up with you personally, usually within one business day."
)
SYSTEM_PROMPT = (
    "You are a customer support agent of an online shop. Answer the customer's latest message in at most "
    "120 words, politely, using only the help-centre articles given. Name the slug of every article you use "
    "in square brackets, e.g. [duplicate-charge]. If the articles do not answer the question, say that a "
    "colleague will follow up. Do not invent policies, amounts or dates."
)


@skill(
    description="Adds reply (ending with a Sources line), cited (article slugs), reply_source ('llm' or "
    "'offline') and llm_error when the LLM failed: an answer grounded in the ticket's articles, written by "
    "the LLM if one is configured, else extracted from the articles.",
    soft_time_limit=30,  # room for one LLM call (its client times out a second before this)
    time_limit=40,
    retries=0,  # it falls back to the offline reply itself
)
def compose_reply(ctx: SkillContext, input: Any) -> Any:
    ticket = ticket_of(input)
    content = content_of(ticket)
    articles = _articles_of(ticket)
    if articles and llm.configured():
        try:
            return {**ticket, **llm_reply(ctx, ticket, content, articles), "reply_source": "llm"}
        except llm.LLMError as exc:
            ctx.log.warning("compose_reply: the LLM failed, answering offline: %s", exc)
            return {
                **ticket,
                **offline_reply(ticket, content, articles),
                "reply_source": "offline",
                "llm_error": str(exc),
            }
    return {**ticket, **offline_reply(ticket, content, articles), "reply_source": "offline"}


def offline_reply(ticket: Ticket, content: str, articles: list[dict[str, Any]]) -> dict[str, Any]:
    """``reply`` and ``cited`` without an LLM: opening, the best-matching article sentences, closing, sources."""
    if not articles:
        return {"reply": f"{opening(ticket)}\n\n{NO_ARTICLES}\n\nSources: none", "cited": []}
    chosen = best_sentences(content, articles[:PROMPT_ARTICLES])
    used = [article for article in articles if article["slug"] in {slug for slug, _ in chosen}]
    body = " ".join(sentence for _, sentence in chosen)
    return {"reply": f"{opening(ticket)}\n\n{body}\n\n{CLOSING}\n\n{sources_line(used)}", "cited": _slugs(used)}


def opening(ticket: Ticket) -> str:
    """The first line for the ticket's intent; a complaint or an angry customer is apologised to."""
    intent = ticket.get("intent")
    text = OPENINGS.get(intent if isinstance(intent, str) else "general", OPENINGS["general"])
    sentiment = ticket.get("sentiment")
    angry = isinstance(sentiment, dict) and bool(sentiment.get("angry"))
    return f"{text} {APOLOGY}" if intent == "complaint" or angry else text


def best_sentences(content: str, articles: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """Up to MAX_SENTENCES (slug, sentence) pairs of ``articles`` sharing most words with ``content``, in text order.

    With no shared word, the top article's first sentence; the rules: docs/skills.md, "compose_reply".
    """
    wanted = {stem(term) for term in query_terms(content)}
    scored = []
    for rank, article in enumerate(articles):
        for position, sentence in enumerate(split_sentences(article["text"])):
            overlap = len(wanted & {stem(term) for term in query_terms(sentence)})
            scored.append((overlap, rank, position, article["slug"], sentence))
    floor = max([2, *(c[0] for c in scored if c[1] == 0)])
    relevant = (c for c in scored if c[0] and (c[1] == 0 or c[0] >= floor))
    best = sorted(relevant, key=lambda c: (-c[0], c[1], c[2]))[:MAX_SENTENCES]
    best = best or scored[:1]
    return [(slug, sentence) for _, _, _, slug, sentence in sorted(best, key=lambda c: (c[1], c[2]))]


def split_sentences(text: str) -> list[str]:
    return [sentence.strip() for sentence in SENTENCE.split(text) if sentence.strip()]


def llm_reply(ctx: SkillContext, ticket: Ticket, content: str, articles: list[dict[str, Any]]) -> dict[str, Any]:
    """``reply`` and ``cited`` written by the LLM from the prompt; raises llm.LLMError."""
    shown = articles[:PROMPT_ARTICLES]
    completion = llm.chat(ctx, prompt_messages(ctx, ticket, content, shown))
    answer = SOURCES_LINE.sub("", completion.text).strip() or completion.text
    used = [article for article in shown if article["slug"] in answer] or shown
    return {"reply": f"{answer}\n\n{sources_line(used)}", "cited": _slugs(used)}


def prompt_messages(
    ctx: SkillContext, ticket: Ticket, content: str, articles: list[dict[str, Any]]
) -> list[dict[str, str]]:
    """The chat: instructions, then the history, intent, articles and the customer's message in one user turn."""
    sections = []
    if history := conversation_history(ctx, content):
        sections.append("Conversation so far:\n" + "\n".join(history))
    sections.append(f"Intent: {ticket.get('intent') or 'unknown'}")
    sections.append("Articles:\n" + "\n\n".join(f"[{a['slug']}] {a['title']}\n{a['text']}" for a in articles))
    sections.append(f"Customer's message:\n{content}")
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": "\n\n".join(sections)}]


def conversation_history(ctx: SkillContext, content: str) -> list[str]:
    """The conversation's last messages as "role: text" lines, oldest first, less the message being answered."""
    lines = ctx.recent_messages(HISTORY_MESSAGES + 1)
    if lines and lines[-1] == ("user", content):
        lines.pop()  # the message being answered is given on its own
    return [f"{role}: {text}" for role, text in lines[-HISTORY_MESSAGES:]]


def sources_line(articles: list[dict[str, Any]]) -> str:
    return "Sources: " + (", ".join(f"{a['title']} ({a['slug']})" for a in articles) or "none")


def _articles_of(ticket: Ticket) -> list[dict[str, Any]]:
    articles = ticket.get("articles") or []
    if not isinstance(articles, list) or not all(_is_article(article) for article in articles):
        raise SkillError("compose_reply: the ticket's articles must be a list of {slug, title, text}", transient=False)
    return articles


def _is_article(article: Any) -> bool:
    return isinstance(article, dict) and all(isinstance(article.get(key), str) for key in ("slug", "title", "text"))


def _slugs(articles: list[dict[str, Any]]) -> list[str]:
    return [article["slug"] for article in articles]
