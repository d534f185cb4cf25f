"""Vectorised plain-torch implementations: the CPU path when the C++ extension is absent,
and the fallback on any device. Host-synchronising, but O(N) and exact."""
