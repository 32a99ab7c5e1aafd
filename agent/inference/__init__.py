"""Models and running them: the LiteRT/tflite-runtime shim, model files, images, classifier."""
