"""Rating: a plan's prices applied to usage, exactly (pure, Decimal, no I/O).

``engine`` rates, ``money`` rounds to the currency's minor unit.
"""
