"""Item text and its embeddings."""

from recbole_genrec.data.item_text import load_item_texts, load_user_texts
from recbole_genrec.data.text_encoder import TextEncoder, item_text_embeddings

__all__ = ["load_item_texts", "load_user_texts", "TextEncoder", "item_text_embeddings"]
