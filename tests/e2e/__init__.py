"""The whole pipeline as processes: `tally` commands, crashes, scale-out, the SDK."""
