"""``lrc finetune``: recovery training of a compressed checkpoint (issue 14; WeLore's LRC-only fine-tuning, methods.md
§4; SVD-LLM's factor update, §3b). ``finetune(checkpoint, cfg, out)`` loads the model, trains the chosen parameters
(``train_model``: causal-LM or distillation loss on packed windows of local or self-generated text, ``loop.train``)
and writes a checkpoint of the same structure to ``out`` (atomically), its report carrying the training record
(data, steps, tokens, loss curve, held-out loss before and after, trained parameters, peak memory). A recipe's
``finetune`` section runs ``train_model`` on the compressed model before it is written (``api.compress``). An
interrupted run's resumable state is kept per output (``run_state``; the recipe path keys it by ``--out`` too)."""
from .config import FinetuneConfig

__all__ = ["FinetuneConfig"]
