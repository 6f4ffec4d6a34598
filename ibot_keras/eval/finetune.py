"""End-to-end fine-tuning with layer-wise learning-rate decay (BEiT-style, as iBOT's
``evaluation/classification_layer_decay``).

With ``depth`` blocks the layers are numbered ``0 .. depth + 1``: the patch embedding,
position embedding and [CLS] token (and mask token) are layer 0, block ``i`` is layer
``i + 1``, everything after the blocks (final norm, classification head) is layer
``depth + 1``. Layer ``l`` trains with ``lr * decay ** (depth + 1 - l)``, so the head gets the
full rate and the embeddings the smallest. Weight decay (decoupled, AdamW) skips biases,
1-D weights (norms), ``pos_embed`` and ``cls_token``, and is scaled like the lr.

Not included here: mixup / cutmix, label smoothing, RandAugment and the warmup + cosine
schedule of the official runs (pass any Keras schedule as ``learning_rate``).
"""

import keras
from keras import ops

from ibot_keras.eval.features import BackboneWrapper
from ibot_keras.eval.scaled_optimizers import LayerwiseAdamW
from ibot_keras.models.vit import VisionTransformer


@keras.saving.register_keras_serializable(package="ibot_keras")
class ViTClassifier(BackboneWrapper):
    """``(B, H, W, C) -> (B, num_classes)`` logits: a linear head on the final-norm [CLS].

    Head init as BEiT: N(0, 0.02) weights and zero bias, both multiplied by
    ``head_init_scale`` (0.001), so the head starts near zero.
    """

    def __init__(self, backbone, num_classes, head_init_scale=0.001, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.backbone = backbone
        self.num_classes = int(num_classes)
        self.head_init_scale = float(head_init_scale)
        self.seed = seed
        self.head = keras.layers.Dense(
            self.num_classes,
            kernel_initializer=keras.initializers.RandomNormal(stddev=0.02 * self.head_init_scale, seed=seed),
            bias_initializer="zeros",
            name="head",
        )
        self.build()

    def build(self, input_shape=None):
        # Inside this model's name scope, so head paths are unique: "<model>/head/kernel".
        self.head.build((None, self.backbone.embed_dim))
        self.built = True

    def call(self, images, training=False):
        return self.head(self.backbone(images, training=training)[:, 0])

    def compute_output_shape(self, images_shape):
        return (images_shape[0], self.num_classes)

    def get_config(self):
        config = super().get_config()
        config.update(
            num_classes=self.num_classes,
            head_init_scale=self.head_init_scale,
            seed=self.seed,
        )
        return config


def build_finetune_model(backbone, num_classes, drop_path_rate=None, head_init_scale=0.001, seed=None):
    """A ``ViTClassifier`` on a fresh copy of ``backbone``'s weights.

    The copy has no mask token (unused in classification) and stochastic depth
    ``drop_path_rate`` (official: ViT-S 0.1, ViT-B 0.2, ViT-L 0.4; default: the backbone's).
    ``backbone`` itself is left untouched.
    """
    config = backbone.get_config()
    for key in ("name", "trainable", "dtype"):
        config.pop(key, None)
    config["use_mask_token"] = False
    if drop_path_rate is not None:
        config["drop_path_rate"] = float(drop_path_rate)
    copy = VisionTransformer(**config)
    source = {name: variable for name, variable, _ in backbone.official_weights()}
    for name, variable, _ in copy.official_weights():
        variable.assign(ops.convert_to_tensor(source[name]))
    return ViTClassifier(copy, num_classes, head_init_scale=head_init_scale, seed=seed)


def _backbone_and_head_variables(model):
    if isinstance(model, VisionTransformer):
        return model, []
    backbone = getattr(model, "backbone", None)
    if not isinstance(backbone, VisionTransformer):
        raise TypeError(f"Expected a VisionTransformer or a model with a .backbone ViT; got {type(model).__name__}.")
    own = {id(v) for v in backbone.variables}
    return backbone, [v for v in model.trainable_variables if id(v) not in own]


def layer_ids(model):
    """``{variable.path: layer_id}`` for every trainable variable of a ViT or a
    ``ViTClassifier`` (see the module doc for the numbering)."""
    backbone, head_variables = _backbone_and_head_variables(model)
    top = backbone.depth + 1
    ids = {}
    for name, variable, _ in backbone.official_weights():
        if not variable.trainable:
            continue
        if name in ("cls_token", "register_tokens", "pos_embed", "masked_embed") or name.startswith("patch_embed."):
            ids[variable.path] = 0
        elif name.startswith("blocks."):
            ids[variable.path] = int(name.split(".")[1]) + 1
        else:
            ids[variable.path] = top
    for variable in head_variables:
        ids[variable.path] = top
    return ids


def layerwise_lr_scales(model, decay):
    """``{variable.path: decay ** (depth + 1 - layer_id)}`` (BEiT's ``LayerDecayValueAssigner``)."""
    depth = _backbone_and_head_variables(model)[0].depth
    return {path: float(decay) ** (depth + 1 - layer) for path, layer in layer_ids(model).items()}


def no_weight_decay_paths(model):
    """Paths of the trainable variables BEiT excludes from weight decay: 1-D weights (biases,
    LayerNorm scale and offset), ``pos_embed``, ``cls_token`` (and ``masked_embed``, register tokens)."""
    backbone, _ = _backbone_and_head_variables(model)
    skip = {id(backbone.pos_embed), id(backbone.cls_token)}
    for extra in (backbone.masked_embed, backbone.register_tokens):
        if extra is not None:
            skip.add(id(extra))
    return [v.path for v in model.trainable_variables if len(v.shape) == 1 or id(v) in skip]


def finetune_optimizer(
    model, learning_rate=5e-4, layer_decay=0.75, weight_decay=0.05, beta_1=0.9, beta_2=0.999, epsilon=1e-8, **kwargs
):
    """``LayerwiseAdamW`` for ``model`` (a ``ViTClassifier`` or a ViT) with BEiT's groups:
    lr and decoupled weight decay scaled by ``layerwise_lr_scales(model, layer_decay)``, no
    decay on ``no_weight_decay_paths(model)``. ``learning_rate`` may be a schedule; extra
    ``kwargs`` go to the optimizer (e.g. ``clipnorm``)."""
    return LayerwiseAdamW(
        learning_rate=learning_rate,
        lr_scales=layerwise_lr_scales(model, layer_decay),
        no_weight_decay=no_weight_decay_paths(model),
        weight_decay=weight_decay,
        beta_1=beta_1,
        beta_2=beta_2,
        epsilon=epsilon,
        **kwargs,
    )
