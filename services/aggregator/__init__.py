"""Aggregator: Kafka envelopes in; Redis counters and ClickHouse raw rows out, exactly once."""
