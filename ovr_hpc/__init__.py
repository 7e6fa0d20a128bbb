"""ovr-hpc: Slurm-native training of Open Vision Reasoner."""
__version__ = "0.1.0"
