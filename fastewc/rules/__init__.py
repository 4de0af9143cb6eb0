"""Built-in factored Fisher rules; importing this package registers them.

One module per layer family: dense, conv, embedding, einsum_dense, norm, scale.
"""
from fastewc.rules import conv, dense, einsum_dense, embedding, norm, scale  # noqa: F401
