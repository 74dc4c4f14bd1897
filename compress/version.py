"""The version of lrc (one home: the package, the run cache's fingerprint and the checkpoint read it)."""
__version__ = "0.1.0"
