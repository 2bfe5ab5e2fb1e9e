"""HuggingFace ``transformers`` integration: the exported model (``modeling_moba.py``,
``configuration_moba.py``: copied into every export), ``moba-cp export hf`` (``export.py``), the
tokenizer files (``tokenizer_files.py``), generation-based needle scoring (``needle_generate.py``)
and the lm-evaluation-harness task (``lm_eval_task.py``). Sits above ``eval/`` (docs/design.md
section 3); ``modeling_moba.py`` itself imports only torch, transformers and ``moba_cp.ops``."""
