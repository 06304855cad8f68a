"""The names of the quantization choices, without torch: the command line builds its
``--quant``/``--where``/``--act-bits`` choices and the config checks its quant keys from here."""

METHOD_NAMES = ("b158", "bitnet", "sign", "xnor")
WHERE_NAMES = ("all", "mlp", "attn", "none")
# --act-bits and quant.act_bits: what each spelling means (default: the method's own, resolved
# once the method is known, in QuantConfig).
ACT_BITS_NAMES: dict[str, int | str | None] = {"8": 8, "1": 1, "none": None, "default": "default"}
