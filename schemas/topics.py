"""Kafka topic names. Partition counts are configuration, not contract."""

EVENTS = "tally.events"
"""Accepted usage events, as per-customer envelopes, keyed by customer id."""

DEAD_LETTERS = "tally.events.dlq"
"""Rejected input with the reason, keyed by customer id when one could be read."""
