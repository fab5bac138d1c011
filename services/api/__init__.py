"""The query API: usage per customer, meters; later enforcement, admin and dashboards."""
