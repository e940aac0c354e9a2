"""One label vocabulary for every chest X-ray adapter.

Each adapter renames its dataset's findings to these snake_case names, so a
column called ``effusion`` means the same finding in every manifest, and a
probe can be compared across datasets label by label. A dataset that does not
annotate a finding leaves that column out of its manifest: a missing finding is
never written as ``0`` (negative).

Core vocabulary (NIH ChestX-ray14's 14 findings + ``no_finding``, then
CheXpert's extra observations):

==============================  ==========================================================
name                            meaning
==============================  ==========================================================
no_finding                      no abnormal finding reported
atelectasis                     atelectasis (any extent)
cardiomegaly                    enlarged cardiac silhouette
effusion                        pleural effusion
infiltration                    infiltrate / infiltration
mass                            mass (lung)
nodule                          nodule (lung)
pneumonia                       pneumonia
pneumothorax                    pneumothorax
consolidation                   consolidation
edema                           (pulmonary) edema
emphysema                       emphysema
fibrosis                        (pulmonary) fibrosis
pleural_thickening              pleural thickening
hernia                          hernia (in chest X-ray sets: hiatal hernia)
enlarged_cardiomediastinum      enlarged cardiomediastinum
lung_opacity                    any lung opacity
lung_lesion                     lung lesion (nodule or mass)
pleural_other                   other pleural finding
fracture                        fracture (any bone)
support_devices                 tubes, lines, pacemakers and other devices
==============================  ==========================================================

Findings that only one dataset annotates keep their own snake_case name (for
instance VinDr-CXR's ``nodule_mass`` and ``aortic_enlargement``, PadChest's
``granuloma``); they are listed per dataset in ``LABEL_MAP`` below, so the whole
renaming is in this one table. The map follows torchxrayvision's harmonisation
(CheXpert "Pleural Effusion" -> ``effusion``, NIH "Pleural_Thickening" ->
``pleural_thickening``), except that PadChest terms are matched exactly (after
stripping and lower-casing), never as substrings.
"""

from __future__ import annotations

VOCABULARY: tuple[str, ...] = (
    "no_finding",
    "atelectasis",
    "cardiomegaly",
    "effusion",
    "infiltration",
    "mass",
    "nodule",
    "pneumonia",
    "pneumothorax",
    "consolidation",
    "edema",
    "emphysema",
    "fibrosis",
    "pleural_thickening",
    "hernia",
    "enlarged_cardiomediastinum",
    "lung_opacity",
    "lung_lesion",
    "pleural_other",
    "fracture",
    "support_devices",
)

_CHEXPERT = {
    "No Finding": "no_finding",
    "Enlarged Cardiomediastinum": "enlarged_cardiomediastinum",
    "Cardiomegaly": "cardiomegaly",
    "Lung Opacity": "lung_opacity",
    "Lung Lesion": "lung_lesion",
    "Edema": "edema",
    "Consolidation": "consolidation",
    "Pneumonia": "pneumonia",
    "Atelectasis": "atelectasis",
    "Pneumothorax": "pneumothorax",
    "Pleural Effusion": "effusion",
    "Pleural Other": "pleural_other",
    "Fracture": "fracture",
    "Support Devices": "support_devices",
}

# Dataset -> {name in the official file: harmonised name}. Several source names may map to one
# harmonised name (PadChest): the harmonised label is then positive when any of them is.
LABEL_MAP: dict[str, dict[str, str]] = {
    # NIH ChestX-ray14: tokens of the `Finding Labels` column (Data_Entry_2017*.csv).
    "nih": {
        "No Finding": "no_finding",
        "Atelectasis": "atelectasis",
        "Cardiomegaly": "cardiomegaly",
        "Effusion": "effusion",
        "Infiltration": "infiltration",
        "Mass": "mass",
        "Nodule": "nodule",
        "Pneumonia": "pneumonia",
        "Pneumothorax": "pneumothorax",
        "Consolidation": "consolidation",
        "Edema": "edema",
        "Emphysema": "emphysema",
        "Fibrosis": "fibrosis",
        "Pleural_Thickening": "pleural_thickening",
        "Hernia": "hernia",
    },
    # CheXpert train.csv / valid.csv observation columns.
    "chexpert": dict(_CHEXPERT),
    # MIMIC-CXR-JPG mimic-cxr-2.0.0-chexpert.csv / -negbio.csv: the same 14 observations.
    "mimic-cxr-jpg": dict(_CHEXPERT),
    # VinDr-CXR image_labels_{train,test}.csv: 22 local findings + 6 global impressions.
    "vindr-cxr": {
        "Aortic enlargement": "aortic_enlargement",
        "Atelectasis": "atelectasis",
        "Calcification": "calcification",
        "Cardiomegaly": "cardiomegaly",
        "Clavicle fracture": "clavicle_fracture",
        "Consolidation": "consolidation",
        "Edema": "edema",
        "Emphysema": "emphysema",
        "Enlarged PA": "enlarged_pa",
        "ILD": "ild",
        "Infiltration": "infiltration",
        "Lung Opacity": "lung_opacity",
        "Lung cavity": "lung_cavity",
        "Lung cyst": "lung_cyst",
        "Mediastinal shift": "mediastinal_shift",
        "Nodule/Mass": "nodule_mass",
        "Pleural effusion": "effusion",
        "Pleural thickening": "pleural_thickening",
        "Pneumothorax": "pneumothorax",
        "Pulmonary fibrosis": "fibrosis",
        "Rib fracture": "rib_fracture",
        "Other lesion": "other_lesion",
        "COPD": "copd",
        "Lung tumor": "lung_tumor",
        "Pneumonia": "pneumonia",
        "Tuberculosis": "tuberculosis",
        "Other diseases": "other_diseases",
        "Other disease": "other_diseases",  # the test file spells it in the singular
        "No finding": "no_finding",
    },
    # RSNA Pneumonia Detection Challenge stage_2_train_labels.csv: `Target` (lung opacity suggestive of
    # pneumonia, as torchxrayvision also reads it).
    "rsna-pneumonia": {"Target": "pneumonia"},
    # PadChest `Labels` terms (lower case). Only terms listed here become columns.
    "padchest": {
        "normal": "no_finding",
        "atelectasis": "atelectasis",
        "laminar atelectasis": "atelectasis",
        "lobar atelectasis": "atelectasis",
        "segmental atelectasis": "atelectasis",
        "round atelectasis": "atelectasis",
        "total atelectasis": "atelectasis",
        "cardiomegaly": "cardiomegaly",
        "pleural effusion": "effusion",
        "loculated pleural effusion": "effusion",
        "loculated fissural effusion": "effusion",
        "infiltrates": "infiltration",
        "interstitial pattern": "infiltration",
        "ground glass pattern": "infiltration",
        "reticular interstitial pattern": "infiltration",
        "reticulonodular interstitial pattern": "infiltration",
        "alveolar pattern": "infiltration",
        "mass": "mass",
        "pulmonary mass": "mass",
        "nodule": "nodule",
        "multiple nodules": "nodule",
        "pneumonia": "pneumonia",
        "pneumothorax": "pneumothorax",
        "hydropneumothorax": "pneumothorax",
        "consolidation": "consolidation",
        "air bronchogram": "consolidation",
        "pulmonary edema": "edema",
        "emphysema": "emphysema",
        "pulmonary fibrosis": "fibrosis",
        "pleural thickening": "pleural_thickening",
        "apical pleural thickening": "pleural_thickening",
        "hiatal hernia": "hernia",
        "fracture": "fracture",
        "rib fracture": "fracture",
        "clavicle fracture": "fracture",
        "humeral fracture": "fracture",
        "vertebral fracture": "fracture",
        "callus rib fracture": "fracture",
        "pacemaker": "support_devices",
        "dual chamber device": "support_devices",
        "single chamber device": "support_devices",
        "electrical device": "support_devices",
        "endotracheal tube": "support_devices",
        "nsg tube": "support_devices",
        "tracheostomy tube": "support_devices",
        "central venous catheter": "support_devices",
        "central venous catheter via jugular vein": "support_devices",
        "central venous catheter via subclavian vein": "support_devices",
        "reservoir central venous catheter": "support_devices",
        "chest drain tube": "support_devices",
        "granuloma": "granuloma",
        "calcified granuloma": "granuloma",
        "tuberculosis": "tuberculosis",
        "bronchiectasis": "bronchiectasis",
        "scoliosis": "scoliosis",
        "aortic elongation": "aortic_elongation",
        "costophrenic angle blunting": "costophrenic_angle_blunting",
    },
}


def harmonised_names(dataset: str) -> list[str]:
    """Harmonised label columns an adapter writes, core vocabulary first, then dataset-specific ones.

    Args:
        dataset: a key of ``LABEL_MAP``.

    Returns:
        Column names without duplicates, in ``VOCABULARY`` order, then in table order.
    """
    targets = list(dict.fromkeys(LABEL_MAP[dataset].values()))
    core = [n for n in VOCABULARY if n in targets]
    return core + [n for n in targets if n not in VOCABULARY]
