"""Audit stream: event types, redaction, sinks and the bounded writer.

Arrives with issue #4. Events never carry literals from queries or values from rows.
"""
