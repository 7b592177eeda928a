"""The model layer: SLEAP's UNet and heads in PyTorch, with TensorFlow's numerics.

`layers` (TensorFlow-exact primitives), `blocks` (block specs and their modules),
`encoder_decoder` (the generic base), `unet` and `config` (`UNet`, `UNetConfig`),
`heads` and `sleap_model` (SLEAP's output heads, `SleapModel`), `validation`
(the checks behind every error message). Imports only `flexunet.kernels`.
"""
