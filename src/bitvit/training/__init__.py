"""Training: the config, the loop and its loss, checkpoints, pretrained starting points
(``--init-from``), the run folder, and evaluation of a model in memory on a data set.

Layer 2. May import `bitvit.files`, `bitvit.system`, `bitvit.nn` and `bitvit.data`; never
`bitvit.deploy`, `bitvit.studies` or the command line.
"""
