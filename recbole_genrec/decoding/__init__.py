"""Decoding: constrained beam search over a prefix trie; the two-level softmax and faiss retrieval."""

from recbole_genrec.decoding.beam_search import PrefixTrie, constrained_beam_search
from recbole_genrec.decoding.two_level_softmax import TwoLevelSoftmax, faiss_mips_index, faiss_search

__all__ = ["PrefixTrie", "constrained_beam_search", "TwoLevelSoftmax", "faiss_mips_index", "faiss_search"]
