"""The names of the quantization choices, importable without torch: the command line builds its
``--quant``/``--where``/``--act-bits`` choices and the config checks its quant keys from here.

What each method does is its row of `bitvit.quant.METHOD_TABLE`; quant.py refuses to import
when the table's names and `METHOD_NAMES` differ, so a method is added in both or neither.
"""

FULL_PRECISION = "fp"  # quant.method for "no quantization": no row in the table
METHOD_NAMES = ("b158", "b158c", "twn", "bitnet", "sign", "xnor")
DEFAULT_METHOD = "b158"  # what `bitvit profile --quant` applies to a checkpoint when not told
WHERE_NAMES = ("all", "mlp", "attn", "none")
# --act-bits and quant.act_bits: what each spelling means (default: the method's own, resolved
# once the method is known, in QuantConfig).
ACT_BITS_NAMES: dict[str, int | str | None] = {"8": 8, "1": 1, "none": None, "default": "default"}
