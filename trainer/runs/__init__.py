"""The run folder: its layout and states (the contract the trainer writes and the studio reads),
saved training states, resuming, and the run's log.
"""
