"""Per-modality building blocks (audio, image, text) shared by the models and recipes."""
