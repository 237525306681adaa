"""OA, AA (mean per-class recall) and Cohen's kappa, through scikit-learn."""
import numpy as np
from sklearn.metrics import accuracy_score, cohen_kappa_score, confusion_matrix


def classification_scores(y_true, y_pred, n_classes):
    """Scores over test pixels.

    y_true, y_pred: (M,) int labels in 1..K. Classes absent from y_true get accuracy NaN
    and are left out of AA. Returns {oa, aa, kappa, per_class_accuracy (K,), confusion (K, K)}.
    """
    labels = np.arange(1, n_classes + 1)
    confusion = confusion_matrix(y_true, y_pred, labels=labels)
    support = confusion.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_class = np.where(support > 0, np.diag(confusion) / support, np.nan)
    return {
        "oa": float(accuracy_score(y_true, y_pred)),
        "aa": float(np.nanmean(per_class)),
        "kappa": float(cohen_kappa_score(y_true, y_pred, labels=labels)),
        "per_class_accuracy": [None if np.isnan(a) else float(a) for a in per_class],
        "confusion": confusion.tolist(),
    }
