"""Publishing: the model card and ``lrc push`` to the Hugging Face Hub."""
from .card import model_card
from .push import push

__all__ = ["model_card", "push"]
