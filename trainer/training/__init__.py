"""A training run: set-up, the loop, one step's arithmetic, progress, optimizers, several processes, sampling.

``setup`` builds everything the loop needs into a ``Session``; ``loop`` is the ``Trainer``; ``step`` is one
step's seed, noise and loss; ``progress`` what a run reports (status, metrics, ETA); ``signals`` a clean stop;
``network`` the run's adapters from its settings; ``saving`` writes them as a kohya file with the run's
metadata; ``optimizers``, ``processes``, ``sampling`` and ``sample_prompts`` are what their names say.
"""
