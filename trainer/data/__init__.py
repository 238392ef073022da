"""Training data: find images and captions, check them, bucket them, plan each epoch, and load batches.

``scan`` walks a kohya-style folder; ``image_io`` reads one image as a viewer shows it; ``captions`` varies
captions per step; ``buckets`` sizes and crops for SDXL's aspect-ratio buckets; ``check`` is the
``check-data`` report; ``epoch_plan`` decides what every step sees, from the seed alone; ``batches`` and
``latent_cache`` turn that plan into tensors.
"""
