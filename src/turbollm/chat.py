"""Rendering conversations with a model's chat template."""
from __future__ import annotations


def render_chat(tokenizer, messages: list[dict], chat_template: str | None = None,
                tools: list[dict] | None = None) -> str:
    """The prompt text of a conversation, ending where the assistant's reply starts.

    transformers renders templates in a sandboxed jinja2 environment, so a template cannot
    reach Python internals.
    """
    if tokenizer is None:
        raise ValueError("this model has no tokenizer, so it cannot render a chat")
    if not messages:
        raise ValueError("messages must not be empty")
    if chat_template is None and not getattr(tokenizer, "chat_template", None):
        raise ValueError("this model has no chat template; pass one")
    extra = {"tools": tools} if tools else {}  # only templates that take tools get them
    return tokenizer.apply_chat_template(messages, chat_template=chat_template, tokenize=False,
                                         add_generation_prompt=True, **extra)
