"""SLEAP's original UNet layout in tf-keras, for `bench_profiles.py` (runs in its own worker process).

Written from SLEAP's description of its UNet: encoder blocks of two 'same' 3x3 ReLU convolutions with a
2x2 'same' max pool before every block but the first and one closing pool, a middle block (expand:
`convs_per_block - 1` convolutions at `filters * rate ** down_blocks`, contract: one), decoder blocks
that upsample x2 (bilinear, or a 3x3 transposed convolution), concatenate the skip first and refine with
two convolutions. Channels are `int(filters * filters_rate ** level)` as in SLEAP. Needs `tensorflow`
and `tf-keras`, which the benchmark runs with its own interpreter (`--keras-python`).
"""

from __future__ import annotations

import math


def sleap_unet(tf_keras, filters: int, filters_rate: float, max_stride: int, output_stride: int,
               in_channels: int, up_interpolate: bool = True, convs_per_block: int = 2):
    """A tf-keras model (None, None, None, in_channels) -> the backbone output."""
    layers = tf_keras.layers
    down, up = int(math.log2(max_stride)), int(math.log2(max_stride // output_stride))

    def width(level):
        return int(filters * filters_rate ** level)

    def convs(x, n, f, name):
        for i in range(n):
            x = layers.Conv2D(f, 3, padding="same", activation="relu", name=f"{name}_conv{i}")(x)
        return x

    x = inputs = tf_keras.Input((None, None, in_channels))
    skips = []
    for b in range(down):
        if b > 0:
            x = layers.MaxPool2D(2, padding="same", name=f"stack0_enc{b}_pool")(x)
        x = convs(x, convs_per_block, width(b), f"stack0_enc{b}")
        skips.append(x)
    x = layers.MaxPool2D(2, padding="same", name=f"stack0_enc{down}_last_pool")(x)
    x = convs(x, convs_per_block - 1, width(down), f"stack0_enc{down + 1}_middle_expand")
    x = convs(x, 1, width(down), f"stack0_enc{down + 2}_middle_contract")
    for b in range(up):
        f = width(down - 1 - b)
        name = f"stack0_dec{b}"
        if up_interpolate:
            x = layers.UpSampling2D(2, interpolation="bilinear", name=f"{name}_interp_bilinear")(x)
        else:
            x = layers.Conv2DTranspose(f, 3, strides=2, padding="same", activation="relu", name=f"{name}_trans_conv")(x)
        x = layers.Concatenate(name=f"{name}_skip_concat")([skips[down - 1 - b], x])
        x = convs(x, convs_per_block, f, f"{name}_refine")
    return tf_keras.Model(inputs, x)


def worker(cases: dict, threads: int, stdin, stdout) -> None:
    """Answer `case<TAB>mode` lines with the seconds of one timed call; bf16 modes build the model
    under Keras' `mixed_bfloat16` policy (bfloat16 compute, float32 variables), as Keras users would."""
    import time

    import numpy as np
    import tensorflow as tf
    import tf_keras

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    current, warm = None, set()
    for line in stdin:
        case, mode = line.rstrip("\n").split("\t")
        if case == "roofline" or mode in ("flops", "bf16 error") or mode.startswith("scale"):
            print("nan", file=stdout, flush=True)  # flexunet-only requests
            continue
        layout, (batch, side, channels) = cases[case]
        precision = "mixed_bfloat16" if mode.endswith("bf16") else "float32"
        if current != (case, precision):
            tf_keras.mixed_precision.set_global_policy(precision)
            model = sleap_unet(tf_keras, layout["filters"], layout["filters_rate"], layout["max_stride"],
                               layout["output_stride"], channels, layout.get("up_interpolate", True))
            x = tf.constant(np.random.default_rng(0).random((batch, side, side, channels), dtype=np.float32))
            target = tf.random.uniform(model(x).shape)
            optimizer = tf_keras.optimizers.Adam(1e-4)
            infer = tf.function(lambda x: model(x, training=False))

            @tf.function
            def train(x, target):
                with tf.GradientTape() as tape:
                    out = tf.cast(model(x, training=True), tf.float32)
                    loss = tf.reduce_mean(tf.square(out - target))
                optimizer.apply_gradients(zip(tape.gradient(loss, model.trainable_variables),
                                              model.trainable_variables))
                return loss

            current = (case, precision)

        def run():
            (train(x, target) if mode.startswith("training") else infer(x)).numpy()

        if (case, mode) not in warm:
            run()
            warm.add((case, mode))
        start = time.perf_counter()
        run()
        print(time.perf_counter() - start, file=stdout, flush=True)
