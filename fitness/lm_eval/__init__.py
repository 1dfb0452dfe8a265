"""The zoo's lm-eval task YAMLs, installed as evomerge.lm_eval_tasks (see evomerge.resources)."""
