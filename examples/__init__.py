"""Example apps built on the Tally SDK."""
