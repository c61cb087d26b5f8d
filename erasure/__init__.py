"""Erasure worker: the right to be forgotten (planner, executor, worker loop).

Arrives with issue #5.
"""
