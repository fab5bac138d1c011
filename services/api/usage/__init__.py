"""Usage over time for one customer and meter, read from live counters and rollups."""
