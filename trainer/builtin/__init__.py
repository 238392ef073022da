"""Built-in models that need no download: the random tiny SDXL and the pretrained toy SDXL.

``tiny`` builds the random tiny model (SDXL's exact layout at tiny widths, for tests); ``toy`` loads the
packaged toy model; ``toy_pretrain`` is the recipe that made it, drawing pictures with ``shapes``;
``resolve`` turns ``builtin:NAME`` into a model folder in the cache.
"""
