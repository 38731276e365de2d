"""Decoding: constrained beam search over a prefix trie; the two-level softmax and faiss retrieval."""

from recbole_genrec.decoding.beam_search import (PrefixTrie, causal_stepper, constrained_beam_search, full_scores,
                                                 item_trie, reorder_state, seq2seq_stepper)
from recbole_genrec.decoding.two_level_softmax import TwoLevelSoftmax, faiss_mips_index, faiss_search

__all__ = ["PrefixTrie", "item_trie", "constrained_beam_search", "full_scores", "seq2seq_stepper", "causal_stepper", "reorder_state",
           "TwoLevelSoftmax", "faiss_mips_index", "faiss_search"]
