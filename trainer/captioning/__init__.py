"""Captions for a dataset folder, written by a model the user already has on disk.

``tagger`` runs a WD14-style tagger (``model.onnx`` and ``selected_tags.csv``) with onnxruntime;
``captioner`` runs a transformers image-to-text folder (BLIP, GIT, Florence-2, ...); ``models`` tells which a
folder holds. ``writer`` turns a model's output into caption text per mode and writes it atomically;
``journal`` lets an interrupted run continue where it stopped; ``run`` walks the images a training run would
find (``data.scan``) and ties them together.
"""
