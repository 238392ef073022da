"""Training data: find images and captions, check them, bucket them, plan each epoch, and load batches.

``subsets`` describes a dataset of several folders (and kohya's regularization balancing); ``scan`` walks them
(``folders``: kohya's ``N_name`` rules) and names every file it leaves out; ``image_io`` reads one image as a
viewer shows it; ``masks`` gives each image its loss mask; ``captions`` varies captions per step; ``buckets``
sizes and crops for SDXL's aspect-ratio buckets; ``check`` is the ``check-data`` report (``tag_stats`` its tag
statistics); ``epoch_plan`` decides what every step sees, from the seed alone; ``batches`` and ``latent_cache``
turn that plan into tensors.
"""
