"""The SDXL model family: its configs, module names, checkpoint files, text encoding and training objective.

``configs`` holds SDXL base 1.0's configs (for the meta-device architecture); ``naming`` maps diffusers
module paths to the SGM layout and kohya stems and lists the modules adapters target; ``model_files``
loads and saves pipelines (diffusers folders, SGM single files, safetensors only); ``sgm_checkpoint``
converts state dicts to the SGM layout; ``text_encoding`` runs both CLIP encoders as SDXL does;
``objective`` is the denoising objective (noise schedule, target, loss weights).
"""
