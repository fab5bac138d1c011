"""The catalog: meters and plans as versioned data, the one owner of their tables.

``store`` writes them (seeding from YAML, the admin API's changes); ``routes`` is the admin
API for plans.  Every service reads the catalog through ``services.common.catalog``.
"""
