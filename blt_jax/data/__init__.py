"""Data layer: corpus selection (`corpus`), the tensorstore data store (`store`), grain pipeline (`pipeline`)."""
