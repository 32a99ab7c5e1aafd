"""Train your own classes from a folder of photos: the Model Maker flow, on a CPU.

    data = ImageFolder("photos/")               # one subfolder per class
    train_data, test_data = data.split(0.9)     # stratified, seeded
    model = train(train_data, base="lite0")     # head only, on cached backbone features
    model.evaluate(test_data)                   # accuracy, per-class figures, confusion
    model.export("out/")                        # fp32 + int8 .tflite, labels inside

Importing this package needs nothing beyond the agent's own dependencies; ``train`` and
``export`` need the ``[train]`` extra (torch, litert-torch) and say so when it is missing.
"""

from edgefleet.training.dataset import Dataset, ImageFolder, image_folder
from edgefleet.training.evaluate import Scores
from edgefleet.training.model import Exported, TrainedModel, train

__all__ = [
    "Dataset",
    "Exported",
    "ImageFolder",
    "Scores",
    "TrainedModel",
    "image_folder",
    "train",
]
