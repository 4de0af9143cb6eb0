"""Built-in factored Fisher rules; importing this package registers them.

One module per layer family: dense, conv, embedding, einsum_dense, norm, scale, recurrent
(LSTM, GRU, SimpleRNN), hub (keras_hub layers, when keras_hub is installed).
"""
from fastewc.rules import conv, dense, einsum_dense, embedding, hub, norm, recurrent, scale  # noqa: F401
