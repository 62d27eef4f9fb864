"""Data layer: corpus selection (`corpus`), the tensorstore data store (`store`), grain pipeline (`pipeline`)."""


def first_few(names, shown: int = 3) -> str:
    """`names` for a one-line message: the first `shown`, then how many more."""
    names = list(names)
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(str(n) for n in names[:shown]) + more
