"""The zero-shot tasks lrc ships as local files (``eval/zeroshot.py`` runs them; a recipe's ``eval.tasks`` names
them): a plain list, so the recipe schema can check names without importing any evaluation code."""
TASKS = ("arc_easy", "arc_challenge", "piqa", "hellaswag", "winogrande", "openbookqa", "lambada_standard", "boolq")
