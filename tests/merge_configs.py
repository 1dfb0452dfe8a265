"""Merge configurations shared by the engine and mergekit-compatibility tests (models by name)."""

from __future__ import annotations

LAYERED = [0.2, 0.7, 0.4, 0.9]

CONFIGS: dict[str, dict] = {
    "linear": {"merge_method": "linear", "models": [
        {"model": "rev", "parameters": {"weight": 0.6}}, {"model": "sort", "parameters": {"weight": 0.3}},
        {"model": "base", "parameters": {"weight": 0.1}}]},
    "linear_unnormalized": {"merge_method": "linear", "parameters": {"normalize": False}, "models": [
        {"model": "rev", "parameters": {"weight": 0.6}}, {"model": "tr", "parameters": {"weight": 0.5}}]},
    "task_arithmetic": {"merge_method": "task_arithmetic", "base_model": "base", "parameters": {"lambda": 0.9},
                        "models": [{"model": "rev", "parameters": {"weight": LAYERED}},
                                   {"model": "sort", "parameters": {"weight": [
                                       {"filter": "self_attn", "value": 0.8}, {"filter": "mlp", "value": [0.1, 0.5]},
                                       {"value": 0.3}]}},
                                   {"model": "tr", "parameters": {"weight": 0.5}}]},
    "ties": {"merge_method": "ties", "base_model": "base", "parameters": {"density": 0.5},
             "models": [{"model": "rev", "parameters": {"weight": 1.0, "density": [0.3, 0.9]}},
                        {"model": "sort", "parameters": {"weight": 0.7}},
                        {"model": "tr", "parameters": {"weight": 0.5, "density": 0.8}}]},
    "ties_unnormalized": {"merge_method": "ties", "base_model": "base", "parameters": {"normalize": False},
                          "models": [{"model": "rev", "parameters": {"weight": 0.5, "density": 0.4}},
                                     {"model": "tr", "parameters": {"weight": 0.5, "density": 0.6}}]},
    "dare_ties_full_density": {"merge_method": "dare_ties", "base_model": "base",
                               "models": [{"model": "rev", "parameters": {"weight": 0.6, "density": 1.0}},
                                          {"model": "sort", "parameters": {"weight": 0.4, "density": 1.0}}]},
    "breadcrumbs": {"merge_method": "breadcrumbs", "base_model": "base",
                    "models": [{"model": "rev", "parameters": {"weight": 0.7, "density": 0.8, "gamma": 0.05}},
                               {"model": "tr", "parameters": {"weight": 0.6, "density": 0.7}}]},
    "breadcrumbs_ties": {"merge_method": "breadcrumbs_ties", "base_model": "base",
                         "models": [{"model": "rev", "parameters": {"weight": 0.7, "density": 0.8}},
                                    {"model": "sort", "parameters": {"weight": 0.6, "density": 0.9}}]},
    "slerp": {"merge_method": "slerp", "base_model": "base", "parameters": {"t": [0.1, 0.6, 0.3]},
              "models": [{"model": "base"}, {"model": "tr"}]},
    "model_stock": {"merge_method": "model_stock", "base_model": "base",
                    "models": [{"model": "rev"}, {"model": "sort"}, {"model": "tr"}]},
    # mergekit 0.1.5's newer methods
    "nuslerp": {"merge_method": "nuslerp", "base_model": "base",
                "models": [{"model": "rev", "parameters": {"weight": [0.2, 0.8]}},
                           {"model": "sort", "parameters": {"weight": [{"filter": "mlp", "value": 0.6},
                                                                       {"value": 0.4}]}}]},
    "nuslerp_rows_no_base": {"merge_method": "nuslerp", "parameters": {"nuslerp_row_wise": True,
                                                                      "nuslerp_flatten": False},
                             "models": [{"model": "rev", "parameters": {"weight": 0.3}},
                                        {"model": "tr", "parameters": {"weight": 0.7}}]},
    "multislerp": {"merge_method": "multislerp", "base_model": "base",
                   "models": [{"model": "rev", "parameters": {"weight": LAYERED}},
                              {"model": "sort", "parameters": {"weight": 0.5}},
                              {"model": "tr", "parameters": {"weight": [{"filter": "self_attn", "value": 0.9},
                                                                        {"value": 0.2}]}}]},
    "multislerp_no_base": {"merge_method": "multislerp", "parameters": {"normalize_weights": False},
                           "models": [{"model": "rev", "parameters": {"weight": 0.6}},
                                      {"model": "sort", "parameters": {"weight": 0.5}}]},
    "karcher": {"merge_method": "karcher", "base_model": "base", "parameters": {"max_iter": 5},
                "models": [{"model": "rev"}, {"model": "sort"}]},
    "sce": {"merge_method": "sce", "base_model": "base", "parameters": {"select_topk": [0.3, 0.8]},
            "models": [{"model": "rev"}, {"model": "sort"}, {"model": "tr"}]},
    "nearswap": {"merge_method": "nearswap", "base_model": "base", "parameters": {"t": [0.001, 0.02]},
                 "models": [{"model": "tr"}]},
    "arcee_fusion": {"merge_method": "arcee_fusion", "base_model": "base", "models": [{"model": "rev"}]},
    "passthrough": {"merge_method": "passthrough",
                    "models": [{"model": "sort", "parameters": {"scale": [{"filter": "o_proj", "value": 0.5},
                                                                          {"filter": "down_proj", "value": [1.2, 0.8]},
                                                                          {"value": 1.0}]}}]},
    "ram": {"merge_method": "ram", "base_model": "base", "parameters": {"epsilon": 2e-3},
            "models": [{"model": "rev"}, {"model": "sort"}, {"model": "tr"}]},
    "ramplus_tl": {"merge_method": "ramplus_tl", "base_model": "base",
                   "parameters": {"epsilon": 2e-3, "r": 0.4, "alpha": [0.1, 0.6]},
                   "models": [{"model": "rev"}, {"model": "sort"}, {"model": "tr"}]},
}

RANDOMIZED: dict[str, dict] = {
    "dare_ties": {"merge_method": "dare_ties", "base_model": "base",
                  "models": [{"model": "rev", "parameters": {"weight": 0.6, "density": [0.3, 0.8]}},
                             {"model": "sort", "parameters": {"weight": 0.5, "density": 0.5}},
                             {"model": "tr", "parameters": {"weight": 0.5, "density": 0.6}}]},
    "dare_linear": {"merge_method": "dare_linear", "base_model": "base",
                    "models": [{"model": "rev", "parameters": {"weight": 0.6, "density": 0.5}},
                               {"model": "tr", "parameters": {"weight": 0.4, "density": 0.5}}]},
    "della": {"merge_method": "della", "base_model": "base",
              "models": [{"model": "rev", "parameters": {"weight": 0.6, "density": 0.5, "epsilon": 0.1}},
                         {"model": "sort", "parameters": {"weight": 0.4, "density": 0.6}}]},
}


def with_paths(cfg: dict, paths: dict) -> dict:
    """The same config with model names replaced by folders (what a file merge reads)."""
    out = dict(cfg)
    out["models"] = [{**m, "model": str(paths[m["model"]])} for m in cfg["models"]]
    if "base_model" in cfg:
        out["base_model"] = str(paths[cfg["base_model"]])
    return out
