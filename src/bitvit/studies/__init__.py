"""Studies: sweeps and their scheduler, the run/group data model, statistics (Holm-adjusted
tests), learning-rate tuning, reports and figures.

Layer 3, beside `bitvit.deploy`. May import `bitvit.files`, `bitvit.nn`, `bitvit.data` and
`bitvit.training`; never `bitvit.deploy` or the command line.
"""
