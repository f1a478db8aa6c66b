"""Typed, versioned results: what metrics.json, evaluations, curves, grids and studies hold.

The one module that writes and reads them (no torch): `schema` (records <-> JSON, versions),
`run` (a run's and an evaluation's metrics), `history` (a fit's epochs), `search` (curve and grid
tables), `study` (study steps).
"""
