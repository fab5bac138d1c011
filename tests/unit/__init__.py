"""Pure code: no store, no network."""
