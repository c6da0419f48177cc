"""Token counts without a tokenizer, and the canonical JSON every digest is taken over.

nerve does not ship a model's tokenizer. Counts are estimated at four UTF-8 bytes per
token, which is close to what Anthropic and common open models report for English and code.
The local upstream counts with the same function, so against it the gateway's estimates are
exact; against a hosted model they are estimates, and budget reservations use the
conservative :func:`worst_case_tokens` (three bytes per token).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

BYTES_PER_TOKEN = 4
WORST_CASE_BYTES_PER_TOKEN = 3


def canonical_json(value: Any) -> str:
    """JSON with sorted keys and no spaces: the same value always gives the same bytes."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def estimate_tokens(text: str) -> int:
    """Estimated tokens in ``text`` (0 for the empty string, at least 1 otherwise)."""
    if not text:
        return 0
    return max(1, (len(text.encode()) + BYTES_PER_TOKEN - 1) // BYTES_PER_TOKEN)


def worst_case_tokens(text: str) -> int:
    """A generous upper estimate of the tokens in ``text``, for reservations."""
    if not text:
        return 0
    return max(1, (len(text.encode()) + WORST_CASE_BYTES_PER_TOKEN - 1)
               // WORST_CASE_BYTES_PER_TOKEN)


def block_key(block: dict[str, Any]) -> str:
    """The canonical text of one prompt block, without its ``cache_control`` marker.

    A cache breakpoint says where to cache, not what: moving a marker must not change the
    prefix it marks, so the marker is left out of both the token count and the digest.
    Plain text blocks and text tool results (most of a conversation) skip JSON: their fields
    joined by a separator no JSON text starts with, as unambiguous and several times cheaper.
    """
    kind = block.get("type")
    size = len(block) - ("cache_control" in block)
    if kind == "text" and size <= 3:
        role = block.get("role")
        if role is None or size == 3:
            return f"\x1f{role or ''}\x1ftext\x1f{block.get('text', '')}"
    elif kind == "tool_result" and isinstance(block.get("content"), str) and size <= 5:
        role = block.get("role")
        known = 3 + (role is not None) + ("is_error" in block)
        if size == known:
            return (f"\x1f{role or ''}\x1ftool_result\x1f{block.get('tool_use_id')}\x1f"
                    f"{bool(block.get('is_error'))}\x1f{block['content']}")
    if "cache_control" in block:
        block = {k: v for k, v in block.items() if k != "cache_control"}
    return canonical_json(block)


def block_tokens(block: dict[str, Any]) -> int:
    return estimate_tokens(block_key(block))


def chain_digest(previous: bytes, block: dict[str, Any]) -> bytes:
    """The digest of a prefix extended by one block (a hash chain over the prompt)."""
    return hashlib.blake2b(previous + block_key(block).encode(), digest_size=16).digest()


def chain(blocks: list[dict[str, Any]]) -> tuple[list[bytes], list[int]]:
    """Digest chain and cumulative token counts of ``blocks`` (each key computed once)."""
    digests: list[bytes] = []
    cum: list[int] = []
    digest, total = b"", 0
    for block in blocks:
        data = block_key(block).encode()
        h = hashlib.blake2b(digest, digest_size=16)
        h.update(data)
        digest = h.digest()
        total += max(1, (len(data) + BYTES_PER_TOKEN - 1) // BYTES_PER_TOKEN) if data else 0
        digests.append(digest)
        cum.append(total)
    return digests, cum


def prompt_blocks(body: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The blocks of an Anthropic Messages request in prompt order, each with a label.

    The order is the one the prompt cache keys on: tools, then system, then the messages'
    content blocks. Labels name the part for people (``tools[run]``, ``system[0]``,
    ``messages[3].content[1]``).
    """
    out: list[tuple[str, dict[str, Any]]] = []
    for tool in body.get("tools") or []:
        out.append((f"tools[{tool.get('name', '?')}]", tool))
    system = body.get("system")
    if isinstance(system, str):
        if system:
            out.append(("system[0]", {"type": "text", "text": system}))
    elif isinstance(system, list):
        for i, block in enumerate(system):
            out.append((f"system[{i}]", block))
    for m, message in enumerate(body.get("messages") or []):
        content = message.get("content")
        if isinstance(content, str):
            out.append((f"messages[{m}].content[0]",
                        {"role": message.get("role"), "type": "text", "text": content}))
            continue
        for c, block in enumerate(content or []):
            # The role is part of what the model sees, so it is part of the block's identity.
            out.append((f"messages[{m}].content[{c}]", {"role": message.get("role"), **block}))
    return out
