"""Adapter math: LoRA and DoRA layers around frozen Linear/Conv2d modules, and putting them into a model.

``weights`` is one adapted layer as the file stores it and the exact merge; ``dora_norm`` the once-per-step
factored norm of V = W + gamma * up @ down; ``dora_autograd`` DoRA's forward and backward as activation
scaling; ``layers`` the modules that own the parameters; ``injection`` finds targets and wraps them;
``decomposition`` the DoRA paper's measure of how far a weight moved in magnitude and in direction.
Nothing here knows about settings files, runs or front ends.
"""
