"""Geocoder: an internal API sold to others, metered and limited by Tally."""
