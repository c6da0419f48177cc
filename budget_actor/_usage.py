"""Token usage of one model call, in the categories that are priced differently."""

from __future__ import annotations

from pydantic import BaseModel


class Usage(BaseModel):
    """Token counts of one call, as Anthropic reports them.

    ``input_tokens`` excludes cached tokens; ``cache_creation_input_tokens`` is the sum of the
    5-minute and 1-hour writes when the provider breaks them down.
    """

    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0
    cache_creation_5m_input_tokens: int = 0
    cache_creation_1h_input_tokens: int = 0

    @property
    def total_input_tokens(self) -> int:
        return self.input_tokens + self.cache_creation_input_tokens + self.cache_read_input_tokens
