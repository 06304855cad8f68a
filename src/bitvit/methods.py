"""The names of the quantization methods, importable without torch (the CLI's choices).

What each method does is its row of `bitvit.quant.METHOD_TABLE`; quant.py refuses to import
when the table's names and `METHOD_NAMES` differ, so a method is added in both or neither.
"""

FULL_PRECISION = "fp"  # quant.method for "no quantization": no row in the table
METHOD_NAMES = ("b158", "b158c", "twn", "bitnet", "sign", "xnor")
DEFAULT_METHOD = "b158"  # what `bitvit profile --quant` applies to a checkpoint when not told
