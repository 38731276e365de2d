"""Decoding: constrained beam search over a prefix trie."""

from recbole_genrec.decoding.beam_search import PrefixTrie, constrained_beam_search

__all__ = ["PrefixTrie", "constrained_beam_search"]
