"""Fused ops and their pure-torch references (one file per op)."""
