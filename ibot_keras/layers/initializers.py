"""Initialisers of the official code."""

import keras


def linear_kernel_init():
    """``trunc_normal_(std=0.02)`` truncated at absolute +-2, i.e. effectively N(0, 0.02)."""
    return keras.initializers.RandomNormal(mean=0.0, stddev=0.02)


def torch_linear_default_init(fan_in):
    """PyTorch's default ``nn.Linear`` weight init, ``U(+-1/sqrt(fan_in))``."""
    bound = 1.0 / float(fan_in) ** 0.5
    return keras.initializers.RandomUniform(-bound, bound)
