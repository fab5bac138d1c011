"""Usage alerts: the rules (a plan's defaults, a customer's own), compiled into the
usage levels the aggregator's batch call checks (``schemas.alerts``), and their routes."""
