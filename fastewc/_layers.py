"""Layer-type facts shared by the XLA defaults of :mod:`fastewc.fisher` and :mod:`fastewc.train`."""
import keras

CONVOLUTIONS = (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D,
                keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D,
                keras.layers.SeparableConv1D, keras.layers.SeparableConv2D,
                keras.layers.Conv1DTranspose, keras.layers.Conv2DTranspose,
                keras.layers.Conv3DTranspose)


def has_convolution(model):
    """Whether ``model`` or any layer nested in it is a convolution (XLA's CPU convolutions
    measured slower than TensorFlow's oneDNN kernels)."""
    layers = [model] + list(model._flatten_layers(include_self=False, recursive=True))
    return any(isinstance(layer, CONVOLUTIONS) for layer in layers)
