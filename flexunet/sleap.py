"""SLEAP-trained models in PyTorch: their raw outputs (`load_model`) and their keypoints (`load_predictor`).

    >>> import flexunet.sleap
    >>> model = flexunet.sleap.load_model("models/centroid")
    >>> outputs = model(images)  # {"CentroidConfmapsHead_0": (N, 1, H/4, W/4), ...}
    >>> predictor = flexunet.sleap.load_predictor(["models/centroid", "models/centered_instance"])
    >>> poses = predictor(frames)  # uint8 (N, H, W, C) -> points (N, instances, nodes, 2), scores

Both take the Keras folders of SLEAP <= 1.4 (`training_config.json` + `best_model.h5`) and the
sleap-nn folders of SLEAP >= 1.5 (`training_config.yaml` + `best.ckpt`), each in its own numerics.
"""

from flexunet.io.folders import KERAS_FILES, SLEAP_NN_FILES, folder_kind, load_model
from flexunet.io.keras_folder import model_from_training_config
from flexunet.nn.encoder_decoder import IntermediateFeature
from flexunet.nn.heads import HeadSpec
from flexunet.nn.sleap_model import SleapModel
from flexunet.predict import Predictions, Predictor, load_predictor

__all__ = ["HeadSpec", "IntermediateFeature", "KERAS_FILES", "Predictions", "Predictor", "SLEAP_NN_FILES",
           "SleapModel", "folder_kind", "load_model", "load_predictor", "model_from_training_config"]
