"""ChatTemplate: messages -> prompt text, by the tokenizer's Jinja template or a plain one for base models.

The plain fallback writes each message as ``Role: content`` on its own paragraph and ends with
``Assistant:``, so a base model continues as the assistant; assistant messages are kept as generated. A
template renders special tokens itself, so its text is tokenized without adding them again; the fallback's
text gets the tokenizer's BOS.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from adapt_runtime.serving.edge.schemas import ChatMessage
from adapt_runtime.serving.failures import InvalidRequest

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

_ROLES = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant", "tool": "Tool"}


class ChatTemplate:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, template_file: Path | None = None) -> None:
        self.tokenizer = tokenizer
        self.jinja = template_file.read_text(encoding="utf-8") if template_file else tokenizer.chat_template
        self.kind = "file" if template_file else ("tokenizer" if self.jinja else "plain")

    def render(self, messages: list[ChatMessage], add_generation_prompt: bool = True) -> tuple[str, bool]:
        """The prompt text, and whether the tokenizer should add its special tokens to it."""
        if self.jinja is None:
            return _plain(messages, add_generation_prompt), True
        plain = [{"role": m.role, "content": m.text()} for m in messages]
        try:
            text = self.tokenizer.apply_chat_template(
                plain, chat_template=self.jinja, add_generation_prompt=add_generation_prompt, tokenize=False
            )
        except Exception as exc:  # noqa: BLE001 - template errors are the request's problem (e.g. role order)
            raise InvalidRequest(f"the chat template rejected these messages: {exc}", "invalid_messages",
                                 "messages") from None
        return str(text), False


def _plain(messages: list[ChatMessage], add_generation_prompt: bool) -> str:
    parts = [_plain_message(m) for m in messages]
    if add_generation_prompt:
        parts.append("Assistant:")
    return "\n\n".join(parts)


def _plain_message(message: ChatMessage) -> str:
    """An assistant message is kept exactly as generated (it followed ``Assistant:`` and usually starts with
    its own space), so the next turn's prompt re-tokenizes to the session's stream and only the suffix is read."""
    role = _ROLES[message.role]
    if message.role != "assistant":
        return f"{role}: {message.text().strip()}"
    text = message.text()
    return f"{role}:{text}" if text[:1].isspace() else f"{role}: {text}"
