"""The names of the codecs a compressed average can use (``compression.codec``): the
communicators implement them (:mod:`localsgd.comm.codecs`), the cost model prices them
(``[codecs.<name>]`` of a cluster file). ``fp8`` needs a torch with ``float8_e4m3fn``."""

CODECS = ("none", "fp16", "bf16", "int8", "int4", "fp8", "topk")
"""Every codec name, ``none`` (values sent as they are) first."""
