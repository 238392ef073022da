"""The kohya adapter file front ends load: write and read it, inspect it, merge it, check it.

``adapter_file`` is the container (docs/adapter-format.md); ``metadata`` the ``ss_*`` and ModelSpec keys;
``inspect`` summarises a file; ``merge`` matches its stems to a model and merges them in;
``frontend_merge`` reproduces how ComfyUI, Forge, AUTOMATIC1111 and InvokeAI merge a stem, and ``verify``
compares them with our exact merge; ``analyze`` says which layers a file changed, in magnitude or direction.
"""
