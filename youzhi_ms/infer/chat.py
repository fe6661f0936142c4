"""A conversation with a chat model: its messages, and the prompt of the next turn.

Every turn's prompt is the whole conversation so far (system prompt from the template, every earlier user message and
reply, the new message, the opening of the assistant's turn) rendered with the tokenizer's chat template, so the model
reads the history in full each turn; the decode cache is not carried from one turn to the next.
"""
from __future__ import annotations

from typing import Dict, List

from youzhi_ms.errors import YouzhiError

EXIT_WORDS = ("exit", "quit", "/exit", "/quit")
RESET_WORD = "/reset"


class Conversation:
    """tok: a youzhi_ms Tokenizer with a chat template; limit: the model's context in tokens; max_new_tokens: the
    longest reply, reserved in the context."""

    def __init__(self, tok, limit: int, max_new_tokens: int):
        self.tok, self.limit, self.max_new_tokens = tok, limit, max_new_tokens
        self.messages: List[Dict[str, str]] = []

    def prompt_ids(self, user_text: str) -> List[int]:
        """The token ids of the next turn's prompt: the conversation so far plus `user_text`; nothing is recorded
        until `add` (a refused turn leaves the conversation as it was)."""
        text = self.tok.apply_chat_template(self.messages + [{"role": "user", "content": user_text}],
                                            add_generation_prompt=True)
        ids = self.tok.encode(text)
        if len(ids) + self.max_new_tokens > self.limit:
            earlier = " with the conversation so far" if self.messages else ""
            raise YouzhiError(f"the prompt{earlier} ({len(ids)} tokens) plus --max-new-tokens {self.max_new_tokens} "
                              f"exceed the model's context of {self.limit} tokens; "
                              + (f"type {RESET_WORD} to start a new conversation, or lower --max-new-tokens"
                                 if self.messages else "shorten the message or lower --max-new-tokens"))
        return ids

    def add(self, user_text: str, reply: str) -> None:
        self.messages += [{"role": "user", "content": user_text}, {"role": "assistant", "content": reply}]

    def reset(self) -> None:
        self.messages = []
