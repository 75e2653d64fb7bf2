"""Every AnnData key ACsleuth writes, named in one place.

The README's "Results in AnnData" table documents each of these. Code that
reads or writes a result imports the name from here, never spells it out.
"""

#: ``obs``: anomaly score per cell, float, higher means more anomalous.
SCORE = "acsleuth_score"
#: ``obs``: the binary anomaly call, bool: score above the threshold, less the cells that resemble the
#: reference once subtypes are found (acsleuth_core.calls).
ANOMALY = "acsleuth_anomaly"
#: ``obs``: the batch/sample each target cell was treated as.
BATCH = "acsleuth_batch"
#: ``obs``: plain reconstruction-residual norm (diagnostic, reported beside the score).
RESIDUAL_NORM = "acsleuth_residual_norm"
#: ``obs``: each view of the score (acsleuth_core.views), standardised by the reference cells (0 = a typical
#: reference cell, in units of their MAD): reconstruction residual, dissimilarity to the most similar reference
#: cells, the paper's MMD predictor.
VIEW_COLUMNS = {
    "residual": "acsleuth_residual_view",
    "similarity": "acsleuth_similarity_view",
    "predictor": "acsleuth_predictor_view",
}
#: ``obs``: p-value of the score against every reference cell's out-of-fold score (threshold.tail_pvalues; the call's input).
PVALUE = "acsleuth_pvalue"
#: ``obsm``: module-I latent embedding.
LATENT = "X_acsleuth"
#: ``uns``: parameters, threshold, training curves and versions.
UNS = "acsleuth"
#: ``uns`` of a normalised AnnData: the kind of values it was given, "counts" or "log".
INPUT_KIND = "acsleuth_input_kind"
#: ``obs``: name of each target cell's kin reference cell (module II); missing for cells past the anomaly threshold.
KIN = "acsleuth_kin"
#: ``obs``: the kin's share of the cell's non-negative reference mix, 0–1; missing for cells called anomalous.
KIN_CONFIDENCE = "acsleuth_kin_confidence"
#: ``layers``: batch-corrected log expression in the reference's gene space (module III); zero outside the model's genes.
CORRECTED = "acsleuth_corrected"
#: ``obsm``: batch-corrected latent embedding (module III).
CORRECTED_LATENT = "X_acsleuth_corrected"
#: ``var``: True for the genes the model was trained on (the genes the corrected layer fills).
MODEL_GENE = "acsleuth_model_gene"
#: ``uns[UNS]`` entry: correction parameters, metrics before/after and training curves.
CORRECTION = "correction"
#: ``obs``: anomaly subtype (categorical "1", "2", …); missing for cells called normal (module IV).
SUBTYPE = "acsleuth_subtype"
#: ``obs``: the subtype's soft-assignment probability (largest ``q``), 0–1; missing for cells called normal.
SUBTYPE_CONFIDENCE = "acsleuth_subtype_confidence"
#: ``obs``: for cells past the threshold, True where the cell resembles the reference, its subtype and its own
#: neighbours alike (likely a normal cell; called normal unless asked not to); missing below the threshold.
SUBTYPE_LIKE_REFERENCE = "acsleuth_subtype_like_reference"
#: ``obsm``: fused embedding ``z*`` of module IV; NaN rows for cells called normal.
FUSED = "X_acsleuth_fused"
#: ``uns[UNS]`` entry: subtype parameters, chosen k and why, cluster sizes, marker genes.
SUBTYPES = "subtypes"
#: ``uns[UNS]`` entry: stages after detection that failed, stage → cause (the output holds what finished).
FAILED_STAGES = "failed_stages"

#: what each stage after detection writes, by AnnData slot (``uns`` entries live under ``uns[UNS]``)
STAGE_KEYS = {
    CORRECTION: {"obs": (KIN, KIN_CONFIDENCE), "obsm": (CORRECTED_LATENT,), "var": (MODEL_GENE,), "layers": (CORRECTED,), "uns": (CORRECTION,)},
    SUBTYPES: {"obs": (SUBTYPE, SUBTYPE_CONFIDENCE, SUBTYPE_LIKE_REFERENCE), "obsm": (FUSED,), "uns": (SUBTYPES,)},
}
