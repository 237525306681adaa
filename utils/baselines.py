"""Classical baselines through the same splits and metrics: spectral SVM and PCA + window-mean SVM."""
import numpy as np
from scipy.ndimage import uniform_filter
from sklearn.decomposition import PCA
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC


def spectral_features(cube):
    """Per-pixel spectra: (H, W, B) -> (H*W, B)."""
    return cube.reshape(-1, cube.shape[-1])


def pca_window_features(cube, n_components=30, window=7, seed=0):
    """First principal components concatenated with their window mean.

    cube: (H, W, B) standardised. PCA is fitted on all pixels (no labels are read).
    Returns (H*W, 2 * n_components) float32.
    """
    h, w, b = cube.shape
    k = min(n_components, b)
    pcs = PCA(n_components=k, random_state=seed).fit_transform(cube.reshape(-1, b)).reshape(h, w, k)
    mean = uniform_filter(pcs, size=(window, window, 1), mode="reflect")
    return np.concatenate([pcs, mean], axis=-1).reshape(h * w, 2 * k).astype(np.float32)


def fit_svm(features, labels, seed=0):
    """RBF SVM on standardised features, C (and gamma) chosen by cross-validation on the training set only.

    features: (M, F); labels: (M,). Returns a callable (M', F) -> (M',) predictions.
    """
    pipeline = make_pipeline(StandardScaler(), SVC(kernel="rbf"))
    min_count = np.bincount(labels).astype(float)
    min_count = int(min_count[min_count > 0].min())
    folds = min(5, min_count)
    grid = {"svc__C": [1, 10, 100, 1000], "svc__gamma": ["scale"]}
    if folds >= 2:
        search = GridSearchCV(pipeline, grid, cv=StratifiedKFold(folds, shuffle=True, random_state=seed))
        model = search.fit(features, labels).best_estimator_
    else:
        model = pipeline.set_params(svc__C=100).fit(features, labels)
    return model.predict
