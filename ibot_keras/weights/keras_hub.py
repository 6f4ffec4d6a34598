"""Export a ``VisionTransformer`` to ``keras_hub.models.ViTBackbone``.

keras-hub is optional (``pip install ibot-keras[keras-hub]``); on Linux it pulls
``tensorflow-text`` and with it the full ``tensorflow`` package, whatever the Keras backend.

keras-hub's ViT has a fixed input size and a learned ``(1 + N, D)`` position table, so the
export is made for one image size; our table is resized to it with the official bicubic
interpolation, so the exported model equals ours run at that size. Its attention is Keras'
``MultiHeadAttention`` (separate query/key/value kernels ``(D, H, D/H)``), which the fused
``qkv`` kernel is split into; everything else maps one to one. The iBOT mask token has no
counterpart (it is only used in pretraining).
"""

import keras

from ibot_keras.weights.layouts import resize_position_table


def _import_keras_hub():
    try:
        import keras_hub
    except ImportError as error:
        raise ImportError(
            "Exporting to keras-hub needs the 'keras-hub' package: `pip install keras-hub` "
            "(on Linux it also installs tensorflow-text and tensorflow). The backbone can be "
            "exported without it with ibot_keras.weights.save_official (.npz/.safetensors/.pth) "
            "or saved as .keras."
        ) from error
    return keras_hub


def to_keras_hub(vit, image_size=None):
    """A ``keras_hub.models.ViTBackbone`` with ``vit``'s weights, for ``image_size`` inputs.

    ``image_size`` defaults to ``vit.image_size``. The result maps ``(B, S, S, C)`` images to
    ``(B, 1 + N, D)`` tokens after the final norm, like ``vit(images)``.
    """
    keras_hub = _import_keras_hub()
    image_size = int(image_size or vit.image_size)
    if image_size % vit.patch_size:
        raise ValueError(f"image_size={image_size} is not a multiple of patch_size={vit.patch_size}.")
    if vit.num_registers:
        raise ValueError(
            f"keras-hub's ViTBackbone has no register tokens; this backbone has num_registers={vit.num_registers}."
        )
    if not vit.qkv_bias:
        raise ValueError(
            "keras-hub's ViTBackbone ties the attention output bias to the qkv bias option; "
            "only qkv_bias=True backbones can be exported."
        )
    dim, heads = vit.embed_dim, vit.num_heads
    head_dim = dim // heads
    hub = keras_hub.models.ViTBackbone(
        image_shape=(image_size, image_size, vit.in_channels),
        patch_size=vit.patch_size,
        num_layers=vit.depth,
        num_heads=heads,
        hidden_dim=dim,
        mlp_dim=int(vit.blocks[0].mlp.fc1.units),
        layer_norm_epsilon=float(vit.norm.epsilon),
        use_mha_bias=vit.qkv_bias,
        use_mlp_bias=True,
        use_class_token=True,
        use_patch_bias=True,
    )

    def value(variable):
        return keras.ops.convert_to_numpy(variable)

    grid = image_size // vit.patch_size
    embedding = hub.get_layer("vit_patching_and_embedding")
    embedding.class_token.assign(value(vit.cls_token))
    embedding.patch_embedding.kernel.assign(value(vit.patch_embed.kernel))
    embedding.patch_embedding.bias.assign(value(vit.patch_embed.bias))
    table = value(vit.pos_embed)
    if table.shape[1] != 1 + grid * grid:
        table = resize_position_table(table, grid, grid)
    embedding.position_embedding.embeddings.assign(table[0])

    encoder = hub.get_layer("vit_encoder")
    for ours, theirs in zip(vit.blocks, encoder.encoder_layers):
        qkv_kernel, qkv_bias = value(ours.attn.qkv.kernel), value(ours.attn.qkv.bias)
        for index, dense in enumerate((theirs.mha.query_dense, theirs.mha.key_dense, theirs.mha.value_dense)):
            columns = slice(index * dim, (index + 1) * dim)
            dense.kernel.assign(qkv_kernel[:, columns].reshape(dim, heads, head_dim))
            dense.bias.assign(qkv_bias[columns].reshape(heads, head_dim))
        theirs.mha.output_dense.kernel.assign(value(ours.attn.proj.kernel).reshape(heads, head_dim, dim))
        theirs.mha.output_dense.bias.assign(value(ours.attn.proj.bias))
        for norm_ours, norm_theirs in ((ours.norm1, theirs.layer_norm_1), (ours.norm2, theirs.layer_norm_2)):
            norm_theirs.gamma.assign(value(norm_ours.gamma))
            norm_theirs.beta.assign(value(norm_ours.beta))
        for dense_ours, dense_theirs in ((ours.mlp.fc1, theirs.mlp.dense_1), (ours.mlp.fc2, theirs.mlp.dense_2)):
            dense_theirs.kernel.assign(value(dense_ours.kernel))
            dense_theirs.bias.assign(value(dense_ours.bias))
    encoder.layer_norm.gamma.assign(value(vit.norm.gamma))
    encoder.layer_norm.beta.assign(value(vit.norm.beta))
    return hub

