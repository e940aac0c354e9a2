"""The probes as estimators with scikit-learn manners (``fit``, ``predict_proba``,
``decision_function``, ``predict``, ``score``), and their solvers.

``knn`` (the DINOv2 weighted kNN, ``KNNProbe``), ``knn_search`` (exact search through FAISS, in
memory or streamed shard by shard under a memory cap), ``knn_bf16`` (a bf16 candidate search with an
exact float32 re-rank), ``knn_topk`` (top-k blocks and their merge), ``mlknn`` (ML-kNN),
``logreg`` (``LogRegProbe``, the DINOv2 logistic-regression protocol), ``_lbfgs`` (the batched
L-BFGS), ``_linalg`` (normalisation, standardisation), ``fewshot`` (episodes solved together).
No torch (the bf16 search imports it when used).
"""
