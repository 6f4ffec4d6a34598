"""The iBOT projection head: MLP -> L2 normalisation -> weight-normalised prototypes."""

import numbers

import keras
from keras import ops

from ibot_keras import backend_specific
from ibot_keras.layers.dense import Dense
from ibot_keras.layers.initializers import linear_kernel_init
from ibot_keras.layers.layer_normalization import LayerNormalization
from ibot_keras.layers.weight_norm_dense import WeightNormDense

_ACTIVATIONS = {
    "gelu": backend_specific.gelu,
    "relu": ops.relu,
}
_NORMS = (None, "ln")
SUPPORTED_NORMS = _NORMS
SUPPORTED_ACTIVATIONS = tuple(sorted(_ACTIVATIONS))


def _positive_int(name, value, why=""):
    """``value`` as an int >= 1 (a whole float is accepted), else a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not float(value).is_integer() or value < 1:
        raise ValueError(f"IBOTHead: {name}={value!r} is not allowed: must be an integer >= 1{why}.")
    return int(value)


def l2_normalize(x, axis=-1, eps=1e-12):
    """``x / max(||x||, eps)`` (``torch.nn.functional.normalize``), computed in float32."""
    x = ops.cast(x, "float32")
    norm = ops.sqrt(ops.sum(ops.square(x), axis=axis, keepdims=True))
    return x / ops.maximum(norm, eps)


@keras.saving.register_keras_serializable(package="ibot_keras")
class IBOTHead(keras.layers.Layer):
    """iBOT head on backbone tokens.

    On ``(B, 1 + N, D)`` returns ``(cls_logits (B, K), patch_logits (B, N, Kp))``; on ``(B, D)``
    (CLS tokens only, the DINO path) returns ``cls_logits (B, K)``.

    The MLP (``nlayers`` Linear layers, ``hidden_dim`` wide, optional LayerNorm
    (``norm="ln"``, eps 1e-5) and activation between them, none after the ``bottleneck_dim``
    output) is shared by both outputs. Its output is L2-normalised (eps 1e-12) and projected
    by weight-normalised prototype layers: ``last_layer`` (``K = out_dim``) for the CLS token
    and ``last_layer2`` (``Kp = patch_out_dim``) for patches, or the same layer when
    ``shared_head=True`` (then ``Kp = K``). ``norm_last_layer=True`` freezes the norm ``g``
    at 1. Logits are float32.

    ``nlayers`` is the official ``iBOTHead`` argument (``PretrainConfig.head_nlayers``);
    ``num_layers``, its earlier name here, is accepted as an alias (also in saved configs).
    """

    def __init__(
        self,
        out_dim,
        patch_out_dim=None,
        hidden_dim=2048,
        bottleneck_dim=256,
        nlayers=3,
        norm=None,
        act="gelu",
        norm_last_layer=True,
        shared_head=True,
        in_dim=None,
        **kwargs,
    ):
        if "num_layers" in kwargs:  # the earlier name (configs saved before the rename)
            alias = kwargs.pop("num_layers")
            if nlayers != 3 and alias != nlayers:
                raise ValueError(f"IBOTHead: nlayers={nlayers!r} and its alias num_layers={alias!r} disagree.")
            nlayers = alias
        # Applied after the sublayers exist, so that trainable=False reaches them.
        trainable = kwargs.pop("trainable", True)
        super().__init__(**kwargs)
        if norm not in _NORMS:
            raise ValueError(
                f"norm={norm!r} is not supported; use one of {_NORMS} (batch norms are not "
                "implemented: they would need cross-replica statistics and EMA of buffers)."
            )
        if act not in _ACTIVATIONS:
            raise ValueError(f"act={act!r} is not supported; use one of {sorted(_ACTIVATIONS)}.")
        self.out_dim = _positive_int("out_dim", out_dim, " (the number of [CLS] prototypes)")
        self.shared_head = bool(shared_head)
        self.requested_patch_out_dim = None if patch_out_dim is None else _positive_int("patch_out_dim", patch_out_dim)
        self.patch_out_dim = self.out_dim if (shared_head or patch_out_dim is None) else self.requested_patch_out_dim
        self.hidden_dim = _positive_int("hidden_dim", hidden_dim)
        self.bottleneck_dim = _positive_int(
            "bottleneck_dim", bottleneck_dim, " (the no-bottleneck head is not implemented)"
        )
        self.nlayers = _positive_int("nlayers", nlayers, " (1 is a single Linear to bottleneck_dim)")
        self.norm = norm
        self.act = act
        self.norm_last_layer = bool(norm_last_layer)
        self.in_dim = None if in_dim is None else _positive_int("in_dim", in_dim)

        # (official index in the nn.Sequential, layer); activations have no weights.
        mlp = []
        dense = lambda units, name: Dense(  # noqa: E731
            units, kernel_initializer=linear_kernel_init(), name=name
        )
        if self.nlayers == 1:
            mlp.append((None, dense(self.bottleneck_dim, "mlp")))
        else:
            index = 0
            for i in range(self.nlayers - 1):
                mlp.append((index, dense(self.hidden_dim, f"mlp_{index}")))
                index += 1
                if norm == "ln":
                    mlp.append(
                        (index, LayerNormalization(epsilon=1e-5, name=f"mlp_{index}"))
                    )
                    index += 1
                mlp.append((index, act))
                index += 1
            mlp.append((index, dense(self.bottleneck_dim, f"mlp_{index}")))
        # Plain lists (not tuples) so that Keras tracks each layer exactly once.
        self._mlp_indices = [index for index, _ in mlp]
        self.mlp_layers = [layer for _, layer in mlp]
        self.last_layer = WeightNormDense(
            self.out_dim, self.bottleneck_dim, train_g=not self.norm_last_layer, name="last_layer"
        )
        if self.shared_head:
            self.last_layer2 = self.last_layer
        else:
            self.last_layer2 = WeightNormDense(
                self.patch_out_dim,
                self.bottleneck_dim,
                train_g=not self.norm_last_layer,
                name="last_layer2",
            )
        if self.in_dim is not None:
            self.build((None, self.in_dim))
        self.trainable = trainable

    @property
    def num_layers(self):
        """``nlayers`` under its earlier name."""
        return self.nlayers

    def build(self, input_shape):
        in_dim = int(input_shape[-1])
        if self.in_dim is not None and in_dim != self.in_dim:
            raise ValueError(f"IBOTHead built for in_dim={self.in_dim}, got inputs {input_shape}.")
        self.in_dim = in_dim
        width = in_dim
        for layer in self.mlp_layers:
            if isinstance(layer, str):
                continue
            layer.build((None, width))
            if isinstance(layer, keras.layers.Dense):
                width = layer.units
        self.last_layer.build((None, self.bottleneck_dim))
        if not self.shared_head:
            self.last_layer2.build((None, self.bottleneck_dim))
        self.built = True

    def bottleneck(self, x):
        """MLP then L2 normalisation: ``(..., D) -> (..., bottleneck_dim)`` float32."""
        for layer in self.mlp_layers:
            x = _ACTIVATIONS[layer](x) if isinstance(layer, str) else layer(x)
        return l2_normalize(x)

    def patch_logits(self, z):
        """Patch logits ``(..., Kp)`` from bottleneck outputs ``(..., bottleneck_dim)``."""
        return self.last_layer2(z)

    def call(self, x):
        if len(x.shape) == 2:
            return self.last_layer(self.bottleneck(x))
        if len(x.shape) != 3:
            raise ValueError(
                f"IBOTHead expects (B, 1 + N, D) tokens or (B, D) CLS features; got shape {x.shape}."
            )
        z = self.bottleneck(x)
        return self.last_layer(z[:, 0]), self.last_layer2(z[:, 1:])

    def compute_output_shape(self, input_shape):
        if len(input_shape) == 2:
            return (input_shape[0], self.out_dim)
        patches = None if input_shape[1] is None else input_shape[1] - 1
        return (input_shape[0], self.out_dim), (input_shape[0], patches, self.patch_out_dim)

    def official_weights(self, include_aliases=False):
        """``[(official_name, variable, layout)]`` in ``named_parameters()`` order.

        With ``include_aliases=True`` the shared ``last_layer2.*`` entries are listed too, as
        the official ``state_dict()`` does.
        """
        weights = []
        for index, layer in zip(self._mlp_indices, self.mlp_layers):
            prefix = "mlp." if index is None else f"mlp.{index}."
            if isinstance(layer, keras.layers.Dense):
                weights += [
                    (prefix + "weight", layer.kernel, "linear"),
                    (prefix + "bias", layer.bias, "same"),
                ]
            elif isinstance(layer, keras.layers.LayerNormalization):
                weights += [(prefix + "weight", layer.gamma, "same"), (prefix + "bias", layer.beta, "same")]
        last_layers = [("last_layer", self.last_layer)]
        if not self.shared_head or include_aliases:
            last_layers.append(("last_layer2", self.last_layer2))
        for name, layer in last_layers:
            weights += [
                (name + ".weight_g", layer.weight_g, "linear"),
                (name + ".weight_v", layer.weight_v, "linear"),
            ]
        return weights

    def get_config(self):
        config = super().get_config()
        config.update(
            out_dim=self.out_dim,
            patch_out_dim=self.requested_patch_out_dim,
            hidden_dim=self.hidden_dim,
            bottleneck_dim=self.bottleneck_dim,
            nlayers=self.nlayers,
            norm=self.norm,
            act=self.act,
            norm_last_layer=self.norm_last_layer,
            shared_head=self.shared_head,
            in_dim=self.in_dim,
        )
        return config
