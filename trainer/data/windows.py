"""The windows of one prepared split, as the data group asks for them: the one choice `data=tokenized` and the
in-memory presets share."""

from __future__ import annotations

from typing import Any

from trainer.data.conversations import ConversationWindows
from trainer.data.prepared import DocumentWindows, PackedWindows


def windows_of(reader: Any, cfg: Any, tokenizer: Any, *, chat: bool) -> Any:
    """The training or eval windows of one prepared split as the data group says: whole conversations, packed or
    one per window; text windows cut from the stream (document-masked or not), or one padded per document."""
    if chat:
        return ConversationWindows(
            reader,
            cfg.seq_len,
            pad_id=tokenizer.pad_token_id,
            packing=bool(cfg.packing),
            truncation=str(cfg.truncation),
        )
    if cfg.packing:
        return PackedWindows(
            reader, cfg.seq_len, document_mask_eos=tokenizer.eos_token_id if cfg.document_mask else None
        )
    return DocumentWindows(reader, cfg.seq_len, tokenizer.pad_token_id)
