"""Adapter math: LoRA and DoRA layers around frozen Linear/Conv2d modules, and putting them into a model.

``weights`` is one adapted layer as the file stores it and the exact merge; ``dora_norm`` the once-per-step
factored norm of V = W + gamma * up @ down; ``dora_autograd`` DoRA's forward and backward as activation
scaling; ``layers`` the modules that own the parameters; ``norm_group`` computes a part's norms together;
``vera`` VeRA's and DVoRA's shared projections and layers; ``quantized`` a quantized frozen base;
``injection`` finds targets and wraps them; ``low_rank`` cuts an update to a lower rank for export;
``decomposition`` the DoRA paper's measure of how far a weight moved in magnitude and in direction.
Nothing here knows about settings files, runs or front ends.
"""
