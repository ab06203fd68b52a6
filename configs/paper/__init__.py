"""Configs that reproduce published preference-optimization experiments, one file per paper setting.

Each `get_config(arg)` cites in its docstring the paper, the table or figure, the model and dataset
hub ids and where each hyper-parameter comes from (values the paper does not state are marked as
assumptions). `:runlocal=1` shrinks any of them to a seconds-long run on a tiny random model of the
same family and a tiny local dataset in the paper dataset's schema (see `common.py`).
"""

CONFIGS = ("dpo_imdb", "dpo_hh", "ipo_synthetic", "zephyr_dpo", "simpo_mistral", "tulu3_dpo", "orpo_mistral",
           "kto_zephyr")
