"""The three problem types, the metrics each one reports (its first the primary: compare's column, tune's
objective) and which way each metric is better. The standard library only: the configuration checks flags
against these names without loading scikit-learn."""

SINGLE, MULTI, REGRESSION = "single_label_classification", "multi_label_classification", "regression"

METRICS = {
    SINGLE: ("accuracy", "f1_macro"),
    MULTI: ("f1_micro", "f1_macro", "f1_samples", "subset_accuracy"),
    REGRESSION: ("mse", "mae", "pearson", "spearman", "r2"),
}
LOWER_IS_BETTER = {"mse", "mae"}


def greater_is_better(metric: str) -> bool:
    return metric not in LOWER_IS_BETTER
