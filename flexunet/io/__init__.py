"""The file layer: models in and out of files.

`keras` and `h5_reader` (Keras `.h5` weights), `keras_folder` (SLEAP <= 1.4
folders), `sleap_nn` and `checkpoint` (sleap-nn folders, the restricted
unpickler), `folders` (telling SLEAP folders apart, loading either),
`serialization` (flexunet's `config.json` + safetensors), `config_tree` and
`config_files` (reading configs with dotted-path errors). Imports
`flexunet.nn` and `flexunet.kernels` only.
"""
