"""OpenMeter's meter API over Tally's meters and usage reads, so its SDK queries unchanged."""
