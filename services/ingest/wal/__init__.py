"""Ingest's write-ahead log: what makes a 202 durable when the broker keeps topics in
memory only (the embedded Tansu of ``tally up``).  See ``journal`` for the design."""
